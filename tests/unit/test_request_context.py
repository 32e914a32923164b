"""The request-log row the request middleware builds from what the resources leave on ``req.context``."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import time
from typing import Any

import falcon
import falcon.testing
import pytest

from falcon_svc.app import create_app
from falcon_svc.dependencies import Dependencies
from falcon_svc.inference import Inference, Result, text_digest
from falcon_svc.lifecycle import Lifecycle
from falcon_svc.middleware import RequestContext
from falcon_svc.model import Model, Prediction
from falcon_svc.requestlog import LogRow
from falcon_svc.settings import Settings

JSON = {"Content-Type": "application/json"}
PREDICTION = Prediction("positive", 0.75, {"negative": 0.05, "neutral": 0.2, "positive": 0.75})


class FakeRequestLog:
    """Our RequestLog as the app uses it: rows are submitted, readiness asks for a status."""

    def __init__(self) -> None:
        self.rows: list[LogRow] = []

    def submit(self, row: LogRow) -> None:
        self.rows.append(row)

    def status(self) -> dict[str, Any]:
        return {"postgres": "unknown", "queue_depth": len(self.rows), "spool_bytes": 0}


@pytest.fixture
def request_log() -> FakeRequestLog:
    return FakeRequestLog()


@pytest.fixture
def logged_client(settings: Settings, model: Model, request_log: FakeRequestLog) -> falcon.testing.TestClient:
    deps = Dependencies(request_log=request_log)  # type: ignore[arg-type]
    return falcon.testing.TestClient(
        create_app(settings, model, dependencies=deps, lifecycle=Lifecycle(), worker_id="test:1")
    )


KEY = b"k" * 32


@pytest.fixture
def keyed_client(settings: Settings, model: Model, request_log: FakeRequestLog) -> falcon.testing.TestClient:
    """The app as get_app builds it when LOG_TEXT_HMAC_KEY is set."""
    deps = Dependencies(request_log=request_log)  # type: ignore[arg-type]
    keyed = dataclasses.replace(settings, log_text_hmac_key=KEY.decode())
    return falcon.testing.TestClient(
        create_app(keyed, model, dependencies=deps, lifecycle=Lifecycle(), worker_id="test:1")
    )


def keyed_digest(texts: list[str]) -> str:
    """HMAC-SHA256 under KEY of the texts' sha256 digests joined by U+001E (one text: its digest)."""
    message = "\x1e".join(text_digest(text) for text in texts).encode()
    return hmac.new(KEY, message, hashlib.sha256).hexdigest()


def test_one_text_is_logged_with_its_label_and_no_digest_without_a_key(logged_client, request_log, model: Model):
    result = logged_client.simulate_post("/infer", body=json.dumps({"text": "I love it"}), headers=JSON)
    (row,) = request_log.rows
    assert row.route == "/infer" and row.method == "POST" and row.status == 200, row
    assert row.request_id == result.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", row.log_id) and row.log_id != row.request_id, "the row key is ours"
    assert row.worker_id == "test:1" and row.model_version == model.version
    assert (row.label, row.confidence) == (result.json["label"], result.json["confidence"])
    assert (row.n_texts, row.cache_hit, row.idempotent_replay) == (1, False, False)
    assert (row.text, row.text_length) == ("I love it", 9)
    assert row.text_hmac is None, "without LOG_TEXT_HMAC_KEY no digest is logged (an unkeyed one is reversible)"
    assert row.client_key_id is None, "no API key, no key id"
    assert row.latency_ms is not None and row.latency_ms >= 0


def test_one_text_is_logged_by_the_keyed_digest_of_its_sha256(keyed_client, request_log):
    keyed_client.simulate_post("/infer", body=json.dumps({"text": "I love it"}), headers=JSON)
    (row,) = request_log.rows
    assert row.text_hmac == keyed_digest(["I love it"]), row
    assert row.text_hmac != text_digest("I love it"), "the plain sha256 (a dictionary reverses it) is not logged"


def test_a_batch_is_logged_by_the_keyed_digest_of_its_digests(keyed_client, request_log, model: Model):
    texts = ["I love it", "awful", "I love it"]
    keyed_client.simulate_post("/infer/batch", body=json.dumps({"texts": texts}), headers=JSON)
    (row,) = request_log.rows
    assert (row.route, row.n_texts, row.model_version) == ("/infer/batch", 3, model.version)
    assert (row.label, row.confidence) == (None, None), "a batch has no one label"
    assert row.text_hmac == keyed_digest(texts)
    assert (row.text, row.text_length) == ("\x1e".join(texts), sum(map(len, texts)))


def test_a_v2_inference_is_logged_under_its_route_template(keyed_client, request_log, model: Model):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["good", "bad"]}]}
    result = keyed_client.simulate_post(f"/v2/models/{model.name}/infer", body=json.dumps(body), headers=JSON)
    assert result.status_code == 200, result.text
    (row,) = request_log.rows
    assert (row.route, row.n_texts, row.text_hmac) == ("/v2/models/{name}/infer", 2, keyed_digest(["good", "bad"]))


def test_a_refused_request_is_logged_without_inference_columns(keyed_client, request_log):
    keyed_client.simulate_post("/infer", body=json.dumps({"text": ""}), headers=JSON)
    (row,) = request_log.rows
    assert row.status == 422 and row.route == "/infer"
    inference_columns = ("model_version", "label", "confidence", "n_texts", "cache_hit", "text_length", "text_hmac")
    assert {name: getattr(row, name) for name in inference_columns} == dict.fromkeys(inference_columns), row
    assert row.text is None


def test_a_request_refused_for_its_api_key_gets_no_row_but_other_4xx_do(settings, model, request_log):
    """Made-up bearer keys cost nginx's rate limit only: they must not become database writes."""
    from falcon_svc.auth.keys import KeyRecord, KeyStore, generate_key, key_sha256

    key = generate_key("client-a")
    store = KeyStore([KeyRecord("client-a", key_sha256(key))])
    deps = Dependencies(request_log=request_log)  # type: ignore[arg-type]
    client = falcon.testing.TestClient(
        create_app(settings, model, dependencies=deps, lifecycle=Lifecycle(), worker_id="test:1", api_keys=store)
    )
    for headers in ({}, {"Authorization": f"Bearer {generate_key('client-a')}"}):
        refused = client.simulate_post("/infer", json={"text": "I love it"}, headers=headers)
        assert refused.status_code == 401, refused.text
    assert request_log.rows == [], "a 401 is in the access log only"

    bad = client.simulate_post("/infer", json={"text": ""}, headers={"Authorization": f"Bearer {key}"})
    assert bad.status_code == 422, bad.text
    (row,) = request_log.rows
    assert (row.status, row.client_key_id) == (422, "client-a"), "an authenticated client's 4xx keeps its row"


def test_probes_and_pages_get_no_row(logged_client, request_log):
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics"):
        logged_client.simulate_get(path)
    assert request_log.rows == [], "only inference routes are logged"


def row_for(inference: Inference, *, route: str = "/infer/batch", **context: Any) -> LogRow:
    """Run the middleware alone over a request whose resource left ``inference``; return its row."""
    request_log = FakeRequestLog()
    middleware = RequestContext("w:1", access_log="off", request_log=request_log)  # type: ignore[arg-type]
    req = falcon.testing.create_req(path=route, method="POST")
    resp = falcon.Response()
    middleware.process_request(req, resp)
    req.uri_template = route
    req.context.inference = inference
    for key, value in context.items():
        req.context[key] = value
    middleware.process_response(req, resp, None, True)
    (row,) = request_log.rows
    return row


@pytest.mark.parametrize(("hits", "expected"), [((True, True), True), ((True, False), False), ((False,), False)])
def test_cache_hit_means_every_text_came_from_the_cache(hits, expected):
    texts = [f"text {i}" for i in range(len(hits))]
    results = [Result(PREDICTION, hit, text_digest(text)) for hit, text in zip(hits, texts, strict=True)]
    assert row_for(Inference(texts, results, "v1")).cache_hit is expected


def test_an_idempotent_replay_is_marked():
    inference = Inference(["a"], [Result(PREDICTION, True, text_digest("a"))], "v1")
    assert row_for(inference).idempotent_replay is False
    assert row_for(inference, idempotent_replay=True).idempotent_replay is True


class _Authenticated:
    """Stands in for the API-key middleware: it leaves the key's id (never the key) on the context."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.client_key_id = "team-a"


class _Classified:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.inference = Inference(["hi"], [Result(PREDICTION, False, text_digest("hi"))], "v1")
        resp.media = {"ok": True}


def test_the_row_names_the_client_key_id_and_keys_its_digest(request_log, caplog):
    context = RequestContext("test:1", "off", request_log, text_hmac_key=KEY)  # type: ignore[arg-type]
    app = falcon.App(middleware=[context, _Authenticated()])
    app.add_route("/infer", _Classified())
    falcon.testing.TestClient(app).simulate_post("/infer")
    (row,) = request_log.rows
    assert row.client_key_id == "team-a", row
    assert row.text_hmac == keyed_digest(["hi"]), row
    assert "LOG_TEXT_HMAC_KEY" not in caplog.text, "no warning when the key is set"


def test_an_unset_key_is_said_once_at_start_naming_the_setting(request_log, caplog):
    RequestContext("test:1", "off", request_log)  # type: ignore[arg-type]
    warnings = [record for record in caplog.records if "LOG_TEXT_HMAC_KEY" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING", caplog.text


def test_nginx_retries_of_one_request_share_the_row_key(logged_client, request_log):
    """A request nginx runs on two units (the first killed after logging it) is one row: same key, same time."""
    now = time.time()
    header = {"X-Falcon-Proxy-Request": f"{'ab' * 16} {now - 0.25:.3f}"}
    for _ in range(2):
        logged_client.simulate_post("/infer", body=json.dumps({"text": "twice"}), headers=JSON | header)
    first, second = request_log.rows
    assert first.log_id == second.log_id == "ab" * 16
    assert first.received_at == second.received_at == pytest.approx(now - 0.25, abs=0.001), "nginx's arrival time"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ab" * 16,  # no time
        f"{'AB' * 16} 1700000000.000",  # nginx's ids are lower-case hex
        f"{'ab' * 15} {time.time():.3f}",  # short
        f"{'ab' * 16} {time.time() - 3600:.3f}",  # an hour off our clock: not believed
        f"{'ab' * 16} {time.time():.3f} x",
    ],
)
def test_a_missing_or_unbelievable_proxy_header_keeps_our_own_key_and_time(logged_client, request_log, value):
    before = time.time()
    logged_client.simulate_post(
        "/infer", body=json.dumps({"text": "x"}), headers=JSON | {"X-Falcon-Proxy-Request": value}
    )
    (row,) = request_log.rows
    assert re.fullmatch(r"[0-9a-f]{32}", row.log_id) and row.log_id != "ab" * 16
    assert before <= row.received_at <= time.time()


def test_an_answer_nginx_retries_elsewhere_keeps_a_key_of_its_own(settings, model, request_log, monkeypatch):
    """A 503 is retried by nginx on the next unit (proxy_next_upstream): that answer must get its row too."""
    from falcon_svc.resources.infer import InferResource

    def unavailable(*args: object, **kwargs: object) -> None:
        raise falcon.HTTPServiceUnavailable(description="not now")

    monkeypatch.setattr(InferResource, "on_post", unavailable)
    deps = Dependencies(request_log=request_log)  # type: ignore[arg-type]
    logged_client = falcon.testing.TestClient(
        create_app(settings, model, dependencies=deps, lifecycle=Lifecycle(), worker_id="test:1")
    )
    header = {"X-Falcon-Proxy-Request": f"{'cd' * 16} {time.time():.3f}"}
    refused = logged_client.simulate_post("/infer", body=json.dumps({"text": "x"}), headers=JSON | header)
    assert refused.status_code == 503, refused.text
    (row,) = request_log.rows
    assert row.status == 503 and re.fullmatch(r"[0-9a-f]{32}", row.log_id) and row.log_id != "cd" * 16
