"""The HTTP contract: fields, order, ids, and the one JSON error shape for every 4xx."""

from __future__ import annotations

import json
import re

import falcon.testing
import pytest

from falcon_svc.app import create_app
from falcon_svc.lifecycle import Lifecycle
from falcon_svc.model import Model

JSON = {"Content-Type": "application/json"}
INFER_FIELDS = {
    "label",
    "confidence",
    "probabilities",
    "model_version",
    "cache_hit",
    "worker_id",
    "processing_time_ms",
    "request_id",
}


def post(client: falcon.testing.TestClient, path: str, body: object, **kwargs) -> falcon.testing.Result:
    headers = {**JSON, **kwargs.pop("headers", {})}
    return client.simulate_post(path, body=json.dumps(body), headers=headers, **kwargs)


def assert_error(result: falcon.testing.Result, status: int, code: str, field: str | None = None) -> None:
    assert result.status_code == status, f"expected {status}, got {result.status_code}: {result.text}"
    assert result.headers["content-type"].startswith("application/json"), result.headers
    body = result.json
    assert set(body) == {"error"}, f"error body has extra keys: {body}"
    assert set(body["error"]) == {"code", "message", "field"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], "error message must not be empty"
    assert body["error"]["field"] == field, body


class TestInfer:
    def test_returns_every_field_with_probabilities_per_label(self, client, model: Model):
        result = post(client, "/infer", {"text": "The staff were wonderful and the room was spotless."})
        assert result.status_code == 200, result.text
        body = result.json
        assert set(body) == INFER_FIELDS
        assert set(body["probabilities"]) == set(model.labels)
        assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
        assert body["confidence"] == body["probabilities"][body["label"]]
        assert sum(body["probabilities"].values()) == pytest.approx(1.0)
        assert body["model_version"] == model.version
        assert body["cache_hit"] is False
        assert body["worker_id"] == "test:1"
        assert body["processing_time_ms"] >= 0

    def test_matches_model_on_normalised_text(self, client, model: Model):
        raw = "  \uff34\uff48\uff45  service\twas\u3000terrible  "
        result = post(client, "/infer", {"text": raw})
        (expected,) = model.predict(["The service was terrible"])
        assert result.json["probabilities"] == pytest.approx(expected.probabilities, abs=1e-12)

    def test_unknown_fields_are_ignored(self, client):
        assert post(client, "/infer", {"text": "fine", "extra": 1}).status_code == 200

    def test_charset_in_content_type_is_accepted(self, client):
        result = client.simulate_post(
            "/infer", body='{"text": "ok"}', headers={"Content-Type": "application/json; charset=utf-8"}
        )
        assert result.status_code == 200, result.text


class TestBatch:
    def test_one_result_per_text_in_order(self, client, model: Model):
        texts = ["I love it", "It is broken and useless", "The store opens at nine", "I love it"]
        result = post(client, "/infer/batch", {"texts": texts})
        assert result.status_code == 200, result.text
        body = result.json
        assert body["count"] == len(texts)
        assert len(body["results"]) == len(texts)
        expected = model.predict(texts)
        for item, prediction in zip(body["results"], expected, strict=True):
            assert item["label"] == prediction.label
            assert item["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-12)
            assert item["cache_hit"] is False
        assert body["results"][0] == body["results"][3]

    def test_batch_equals_singles(self, client):
        texts = ["great value", "awful support", "the box is blue"]
        batch = post(client, "/infer/batch", {"texts": texts}).json["results"]
        for text, item in zip(texts, batch, strict=True):
            single = post(client, "/infer", {"text": text}).json
            assert single["probabilities"] == pytest.approx(item["probabilities"], abs=1e-12)

    def test_fifty_texts_allowed(self, client):
        assert post(client, "/infer/batch", {"texts": ["ok"] * 50}).status_code == 200


class TestRequestId:
    def test_sane_client_id_is_echoed(self, client):
        result = post(client, "/infer", {"text": "hi"}, headers={"X-Request-ID": "abc-123_x.y:z"})
        assert result.headers["x-request-id"] == "abc-123_x.y:z"
        assert result.json["request_id"] == "abc-123_x.y:z"

    @pytest.mark.parametrize("bad", ["", "has space", "x" * 200, "<script>", "-leading-dash", "é"])
    def test_insane_client_id_is_replaced(self, client, bad):
        result = post(client, "/infer", {"text": "hi"}, headers={"X-Request-ID": bad})
        generated = result.headers["x-request-id"]
        assert generated != bad
        assert re.fullmatch(r"[0-9a-f]{32}", generated), f"generated id {generated!r} is not 32 lowercase hex digits"
        assert result.json["request_id"] == generated

    def test_generated_ids_are_unique_and_on_errors_too(self, client):
        first = post(client, "/infer", {"text": "hi"}).headers["x-request-id"]
        second = post(client, "/infer", {}).headers["x-request-id"]
        assert first != second


class TestBadInput:
    def test_malformed_json_is_400(self, client):
        result = client.simulate_post("/infer", body="{not json", headers=JSON)
        assert_error(result, 400, "invalid_json")

    def test_invalid_utf8_is_400(self, client):
        result = client.simulate_post("/infer", body=b'{"text": "\xff\xfe"}', headers=JSON)
        assert_error(result, 400, "invalid_json")

    def test_empty_body_is_400(self, client):
        assert_error(client.simulate_post("/infer", body="", headers=JSON), 400, "invalid_json")

    @pytest.mark.parametrize(
        "raw",
        [
            '{"text": "good"}'.encode("utf-16"),  # with its BOM; json.loads(bytes) would accept it
            '{"text": "good"}'.encode("utf-16-le"),
            '{"text": "good"}'.encode("utf-32"),
            b'\xef\xbb\xbf{"text": "good"}',  # UTF-8 with a byte order mark
        ],
        ids=["utf-16", "utf-16-le", "utf-32", "utf-8-bom"],
    )
    def test_a_body_that_is_not_plain_utf8_is_400(self, client, raw):
        assert_error(client.simulate_post("/infer", body=raw, headers=JSON), 400, "invalid_json")

    @pytest.mark.parametrize(
        "raw",
        ['{"texts": ["a"], "x": NaN}', '{"text": "a", "n": Infinity}', '{"text": "a", "n": -Infinity}'],
    )
    def test_nan_and_infinity_are_400(self, client, raw):
        result = client.simulate_post("/infer", body=raw, headers=JSON)
        assert_error(result, 400, "invalid_json")
        assert "is not a JSON value" in result.json["error"]["message"], result.json

    @pytest.mark.parametrize(
        "raw", ['{"text": "good", "text": "bad"}', '{"texts": [{"a": 1, "a": 2}]}'], ids=["top", "nested"]
    )
    def test_duplicate_keys_are_400(self, client, raw):
        result = client.simulate_post("/infer" if '"text"' in raw else "/infer/batch", body=raw, headers=JSON)
        assert_error(result, 400, "invalid_json")
        assert "appears more than once" in result.json["error"]["message"], result.json

    @pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
    def test_wrong_content_type_is_415(self, client, content_type):
        headers = {"Content-Type": content_type} if content_type else {}
        result = client.simulate_post("/infer", body='{"text": "x"}', headers=headers)
        assert_error(result, 415, "unsupported_media_type")

    @pytest.mark.parametrize("body", [[], "text", 3, None])
    def test_non_object_body_is_422(self, client, body):
        assert_error(post(client, "/infer", body), 422, "invalid_input")

    def test_missing_text_is_422(self, client):
        assert_error(post(client, "/infer", {"txt": "x"}), 422, "invalid_input", "text")

    @pytest.mark.parametrize("value", [1, 1.5, True, ["x"], {"a": "b"}])
    def test_non_string_text_is_422(self, client, value):
        assert_error(post(client, "/infer", {"text": value}), 422, "invalid_input", "text")

    @pytest.mark.parametrize("value", ["", "   ", "\n\t\u3000 "])
    def test_blank_text_is_422(self, client, value):
        assert_error(post(client, "/infer", {"text": value}), 422, "invalid_input", "text")

    def test_text_at_limit_after_normalisation_is_accepted(self, client):
        # Padding and whitespace runs do not count: the limit applies after normalisation.
        text = "  " + "a " * 2499 + "a" + "   "
        assert post(client, "/infer", {"text": text}).status_code == 200

    def test_too_long_text_is_422(self, client):
        assert_error(post(client, "/infer", {"text": "a" * 5001}), 422, "invalid_input", "text")

    def test_text_that_normalisation_would_blow_up_is_refused_first(self, client):
        # U+FDFA becomes 18 characters under NFKC: refused on its raw length.
        assert_error(post(client, "/infer", {"text": "\ufdfa" * 30_000}), 422, "invalid_input", "text")

    def test_lone_surrogate_is_422(self, client):
        body = b'{"text": "bad \\ud800 text"}'
        assert_error(client.simulate_post("/infer", body=body, headers=JSON), 422, "invalid_input", "text")

    def test_body_over_limit_is_413(self, client):
        result = post(client, "/infer", {"text": "a" * (3 * 1024 * 1024)})
        assert_error(result, 413, "payload_too_large")

    def test_zero_texts_is_422(self, client):
        assert_error(post(client, "/infer/batch", {"texts": []}), 422, "invalid_input", "texts")

    def test_too_many_texts_is_422(self, client):
        assert_error(post(client, "/infer/batch", {"texts": ["x"] * 51}), 422, "invalid_input", "texts")

    def test_bad_item_names_its_index(self, client):
        assert_error(post(client, "/infer/batch", {"texts": ["ok", " ", "ok"]}), 422, "invalid_input", "texts[1]")
        assert_error(post(client, "/infer/batch", {"texts": ["ok", 7]}), 422, "invalid_input", "texts[1]")

    def test_texts_not_a_list_is_422(self, client):
        assert_error(post(client, "/infer/batch", {"texts": "one"}), 422, "invalid_input", "texts")

    def test_unknown_route_is_404(self, client):
        assert_error(client.simulate_get("/nope"), 404, "not_found")
        assert_error(client.simulate_post("/infer/nope", body="{}", headers=JSON), 404, "not_found")

    @pytest.mark.parametrize(("method", "path"), [("GET", "/infer"), ("PUT", "/infer/batch"), ("POST", "/healthz")])
    def test_wrong_method_is_405(self, client, method, path):
        assert_error(client.simulate_request(method, path), 405, "method_not_allowed")


class TestProbes:
    def test_healthz(self, client):
        assert client.simulate_get("/healthz").json == {"status": "alive"}

    @pytest.mark.parametrize("path", ["/healthz", "/readyz"])
    def test_head_on_probes_is_200_without_a_body(self, client, path):
        result = client.simulate_head(path)
        assert result.status_code == 200, result.text
        assert result.content == b"", "HEAD must not carry a body"

    def test_readyz_ready_then_draining(self, client, lifecycle: Lifecycle):
        ready = client.simulate_get("/readyz")
        assert ready.status_code == 200
        assert ready.json["status"] == "ready" and ready.json["reasons"] == []
        lifecycle.begin_drain()
        draining = client.simulate_get("/readyz")
        assert draining.status_code == 503
        assert draining.json["reasons"] == ["draining"]
        assert client.simulate_get("/v2/health/ready").status_code == 503

    def test_readyz_warns_about_dummy_model(self, client, model: Model):
        warnings = client.simulate_get("/readyz").json["warnings"]
        assert (model.kind == "dummy") == any("dummy" in warning for warning in warnings)

    def test_models_lists_metadata(self, client, model: Model):
        (listed,) = client.simulate_get("/v1/models").json["models"]
        assert listed["version"] == model.version
        assert listed["labels"] == list(model.labels)
        assert listed["metadata"]["sha256"] == model.metadata["sha256"]

    def test_models_shows_no_absolute_paths(self, settings, model: Model, lifecycle: Lifecycle):
        # Artifacts trained before 2026-12 recorded where their evaluation sets lay.
        metadata = {**model.metadata, "evaluation": {"clean": {"path": "/srv/train/tests/data/clean_sentences.csv"}}}
        with_paths = Model(model._scorer, model.scorer, metadata)
        client = falcon.testing.TestClient(create_app(settings, with_paths, lifecycle=lifecycle))
        body = json.dumps(client.simulate_get("/v1/models").json)
        assert "/srv/train" not in body, body
        assert '"clean_sentences.csv"' in body, "the file name itself stays"

    def test_metrics_exposes_request_counts(self, client):
        post(client, "/infer", {"text": "metrics please"})
        text = client.simulate_get("/metrics").text
        assert 'falcon_http_requests_total{method="POST",route="/infer",status="200"}' in text
        assert "falcon_inference_duration_seconds_bucket" in text
        assert "falcon_model_info" in text
