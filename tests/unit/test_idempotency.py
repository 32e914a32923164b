"""Idempotency without Redis: the request fingerprint, the key's rules, the judgement of a
stored record, and how the middleware answers each outcome.

The store against a real redis-server (atomic claims, expiry, Redis dying) is
covered by tests/integration/test_redis_cache_idempotency.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import replace
from typing import Any

import falcon
import falcon.testing
import pytest

from falcon_svc.app import create_app
from falcon_svc.dependencies import Dependencies
from falcon_svc.errors import APIError
from falcon_svc.idempotency import (
    HEADER,
    KEY_PREFIX,
    Claim,
    Outcome,
    fingerprint,
    judge,
    media_type,
    scoped_key,
    validate_key,
)
from falcon_svc.middleware import IdempotencyMiddleware
from falcon_svc.model import Model
from falcon_svc.settings import Settings

JSON_TYPE = "application/json"
JSON = {"Content-Type": JSON_TYPE}


def fp(
    body: bytes,
    path: str = "/infer",
    content_type: str | None = "application/json",
    method: str = "POST",
    header_length: str | None = None,
) -> str:
    return fingerprint(method, path, content_type, body, header_length=header_length)


class TestFingerprint:
    def test_json_key_order_and_whitespace_do_not_matter(self):
        compact = b'{"texts":["a","b"],"options":{"x":1,"y":[1,2]}}'
        spread = b'{\n  "options": { "y": [1, 2], "x": 1 },\n  "texts": [ "a", "b" ]\n}'
        assert fp(compact, "/infer/batch") == fp(spread, "/infer/batch")

    def test_json_escapes_and_the_characters_they_stand_for_are_one_body(self):
        escaped = b'{"text": "caf\\u00e9"}'
        literal = '{"text": "café"}'.encode()
        assert fp(escaped) == fp(literal)

    @pytest.mark.parametrize(
        ("method", "path", "content_type", "body"),
        [
            ("PUT", "/infer", "application/json", b'{"text": "a"}'),
            ("POST", "/infer/batch", "application/json", b'{"text": "a"}'),
            ("POST", "/infer", "application/json", b'{"text": "b"}'),
            ("POST", "/infer", "application/json", b'{"text": "a", "extra": null}'),
            ("POST", "/infer", "application/json", b'["text", "a"]'),
            ("POST", "/infer", "text/plain", b'{"text": "a"}'),
            ("POST", "/infer", None, b'{"text": "a"}'),
            ("POST", "/infer", "application/json; charset=latin-1", b'{"text": "a"}'),
        ],
    )
    def test_another_method_path_media_type_or_body_is_another_request(self, method, path, content_type, body):
        assert fp(body, path, content_type, method) != fp(b'{"text": "a"}')

    @pytest.mark.parametrize(
        "content_type",
        ["application/json; charset=utf-8", 'Application/JSON;Charset="UTF-8"', "application/json ;  charset=utf-8"],
    )
    def test_the_spelling_of_one_media_type_does_not_matter(self, content_type):
        assert fp(b"{}", content_type=content_type) == fp(b"{}", content_type="application/json; charset=utf-8")

    def test_parameter_order_does_not_matter_but_values_do(self):
        assert fp(b"{}", content_type="a/b; x=1; y=2") == fp(b"{}", content_type="a/b; y=2; x=1")
        assert fp(b"{}", content_type="a/b; x=1") != fp(b"{}", content_type="a/b; x=2")
        assert fp(b"{}", content_type='a/b; x="1; y=2"') != fp(b"{}", content_type="a/b; x=1; y=2"), (
            "a quoted value must not pass for two parameters"
        )

    def test_no_path_can_run_into_the_media_type(self):
        # A percent-decoded path may hold a newline: joined by newlines, these two would be one request.
        assert fp(b"x", "/infer\ntext/plain", "") != fp(b"\nx", "/infer", "text/plain")

    def test_outside_json_every_byte_counts(self):
        assert fp(b"text=a b", content_type="text/plain") != fp(b"text=a  b", content_type="text/plain")

    def test_invalid_utf8_is_hashed_as_its_bytes_not_an_error(self):
        assert fp(b'{"text": "\xff\xfe"}') != fp(b'{"text":"\xff\xfe"}'), "not canonicalised: it is not JSON"

    def test_json_too_deep_to_parse_is_hashed_as_its_bytes_not_an_error(self):
        assert fp(b"[" * 100_000) != fp(b"[" * 99_999)

    def test_a_binary_body_is_hashed_as_its_bytes_with_its_header_length(self):
        body = b'{"inputs": []}\x00\x01'
        binary = "application/octet-stream"
        assert fp(body, content_type=binary, header_length="14") != fp(body, content_type=binary, header_length="13"), (
            "where the JSON ends changes what the body means"
        )
        assert fp(b'{"a": 1}', content_type=binary, header_length="8") != fp(
            b'{"a":1} ', content_type=binary, header_length="8"
        ), "a binary-extension body is not canonicalised"
        assert fp(body, content_type=binary, header_length="14") != fp(body, content_type=binary)


class TestMediaType:
    def test_type_and_parameter_names_lowercased_parameters_sorted_charset_folded(self):
        assert media_type('Application/JSON; Version=2; Charset="UTF-8"') == (
            "application/json",
            (("charset", "utf-8"), ("version", "2")),
        )

    def test_other_parameter_values_keep_their_case(self):
        assert media_type("a/b; boundary=AbC") == ("a/b", (("boundary", "AbC"),))

    @pytest.mark.parametrize("content_type", [None, ""])
    def test_no_content_type_is_empty(self, content_type):
        assert media_type(content_type) == ("", ())


class TestScopedKey:
    def test_the_same_key_on_another_route_is_another_key(self):
        assert scoped_key("/infer", "", "order-1") != scoped_key("/infer/batch", "", "order-1")

    def test_the_same_key_from_another_client_is_another_key(self):
        assert scoped_key("/infer", "client-a", "order-1") != scoped_key("/infer", "client-b", "order-1")
        assert scoped_key("/infer", "", "order-1") != scoped_key("/infer", "client-a", "order-1")

    def test_the_layout_is_route_digest_client_then_key(self):
        route = hashlib.sha256(b"/infer").hexdigest()
        assert scoped_key("/infer", "", "order-1") == f"{route}::order-1"
        assert scoped_key("/infer", "key-7", "a:b") == f"{route}:key-7:a:b"

    def test_a_colon_in_the_key_cannot_pass_for_the_client(self):
        # The client scope may not hold ":", so ("a", "b:c") and ("a:b", "c") cannot meet.
        assert scoped_key("/infer", "a", "b:c") != scoped_key("/infer", "", "a:b:c")
        with pytest.raises(ValueError):
            scoped_key("/infer", "a:b", "c")

    @pytest.mark.parametrize("scope", ["has space", "x" * 65, "caf\u00e9", "nl\n"])
    def test_a_client_scope_outside_its_alphabet_is_a_programming_error(self, scope):
        with pytest.raises(ValueError, match="client scope"):
            scoped_key("/infer", scope, "order-1")

    def test_the_store_prefix_is_new_so_old_records_are_never_read(self):
        assert not KEY_PREFIX.startswith("falcon:idem:"), "an old client-chosen key could pose as a new key"
        assert KEY_PREFIX != "falcon:idem"


class TestValidateKey:
    @pytest.mark.parametrize("key", ["a", "x" * 255, "order-1", "!~%2F{}", "0123456789" * 25])
    def test_one_to_255_visible_ascii_characters_pass_unchanged(self, key):
        assert validate_key(key) == key

    @pytest.mark.parametrize(
        "key",
        ["", "x" * 256, "has space", " leading", "tab\there", "caf\u00e9", "\u00a0nbsp", "del\x7f", "nl\n"],
    )
    def test_anything_else_is_a_400_naming_the_header(self, key):
        with pytest.raises(APIError) as raised:
            validate_key(key)
        error = raised.value
        assert error.status_code == 400, error.status
        assert error.code == "invalid_idempotency_key", error.code
        assert error.field == HEADER, error.field


def record(state: str, fp: str, **extra: Any) -> bytes:
    return json.dumps({"state": state, "fp": fp, "token": "t0k3n", **extra}).encode()


class TestJudge:
    def test_a_stored_answer_to_the_same_request_is_replayed_as_stored(self):
        stored = {"status": 201, "headers": {"X-Request-ID": "r-1"}, "body": '{"ok": true}'}
        claim = judge(record("done", "fp-1", **stored), "fp-1", "falcon:idem:k")
        assert claim.outcome is Outcome.REPLAYED, claim
        assert claim.key == "falcon:idem:k"
        assert claim.stored == {"state": "done", "fp": "fp-1", "token": "t0k3n", **stored}

    @pytest.mark.parametrize("state", ["done", "pending"])
    def test_another_request_under_the_key_is_a_mismatch(self, state):
        claim = judge(record(state, "fp-1", status=200, headers={}, body="{}"), "fp-2", "falcon:idem:k")
        assert claim.outcome is Outcome.MISMATCH, claim
        assert claim.stored is None, "a mismatch must not hand out another request's answer"

    def test_the_same_request_still_in_flight_is_a_conflict(self):
        claim = judge(record("pending", "fp-1"), "fp-1", "falcon:idem:k")
        assert claim.outcome is Outcome.CONFLICT, claim
        assert claim.stored is None

    @pytest.mark.parametrize(
        "existing",
        [b"not json", b'{"fp": "fp-1"}', b'{"state": "done"}', b"[1, 2]", b'"a string"', b"null", b"\xff"],
    )
    def test_an_unreadable_record_proceeds_without_idempotency_and_says_so(self, existing, caplog):
        with caplog.at_level(logging.WARNING, logger="falcon_svc.idempotency"):
            claim = judge(existing, "fp-1", "falcon:idem:k")
        assert claim.outcome is Outcome.UNAVAILABLE, claim
        assert "falcon:idem:k" in caplog.text, "an unreadable record must be logged with its key"


class FakeStore:
    """Our ``IdempotencyStore`` interface: ``begin`` answers a chosen claim; the rest is noted."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.begun: list[tuple[str, str]] = []
        self.completed: list[tuple[Claim, int, bytes, dict[str, str]]] = []
        self.released: list[Claim] = []

    def begin(self, key: str, request_fingerprint: str, attempt_of: str = "") -> Claim:
        self.begun.append((key, request_fingerprint))
        return self.claim

    def complete(self, claim: Claim, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.completed.append((claim, status, body, headers))

    def release(self, claim: Claim) -> None:
        self.released.append(claim)


class CountingModel:
    """The real model, counting the texts it is asked to score."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self.predicted: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, texts):
        self.predicted.extend(texts)
        return self._model.predict(texts)


@pytest.fixture
def counting_model(model: Model) -> CountingModel:
    return CountingModel(model)


def serve(settings: Settings, model: CountingModel, claim: Claim) -> tuple[falcon.testing.TestClient, FakeStore]:
    store = FakeStore(claim)
    app = create_app(settings, model, dependencies=Dependencies(idempotency=store), worker_id="t:1")
    return falcon.testing.TestClient(app), store


def infer(client: falcon.testing.TestClient, text: str = "pay once", key: str | None = "order-1"):
    headers = {**JSON, **({HEADER: key} if key is not None else {})}
    return client.simulate_post("/infer", body=json.dumps({"text": text}), headers=headers)


def assert_refused(result: falcon.testing.Result, status: int, code: str) -> None:
    assert result.status_code == status, f"expected {status}, got {result.status_code}: {result.text}"
    assert result.json["error"]["code"] == code, result.json
    assert result.json["error"]["field"] == HEADER, result.json


class TestMiddleware:
    def test_a_request_in_flight_is_a_409_with_retry_after_and_nothing_computed(self, settings, counting_model):
        client, _ = serve(settings, counting_model, Claim(Outcome.CONFLICT, "falcon:idem:order-1"))
        result = infer(client)
        assert_refused(result, 409, "idempotency_key_in_flight")
        assert result.headers.get("retry-after") == "1", result.headers
        assert counting_model.predicted == [], "a conflict must not compute"

    def test_another_request_under_the_key_is_a_422_without_retry_after(self, settings, counting_model):
        client, _ = serve(settings, counting_model, Claim(Outcome.MISMATCH, "falcon:idem:order-1"))
        result = infer(client)
        assert_refused(result, 422, "idempotency_key_mismatch")
        assert "retry-after" not in result.headers, "retrying a mismatch cannot help"
        assert counting_model.predicted == [], "a mismatch must not compute"

    def test_a_replay_is_the_stored_response_with_its_headers(self, settings, counting_model):
        stored = {
            "state": "done",
            "status": 201,
            "body": '{"label": "stored"}',
            "headers": {"X-Request-ID": "original-id", "Content-Type": "application/json"},
        }
        client, store = serve(settings, counting_model, Claim(Outcome.REPLAYED, "falcon:idem:order-1", stored=stored))
        result = infer(client, key="order-1")
        assert result.status_code == 201, result.text
        assert result.content == b'{"label": "stored"}', "the stored body, byte for byte"
        assert result.headers.get("idempotent-replayed") == "true", result.headers
        assert result.headers["x-request-id"] == "original-id", "a replay answers with the original request id"
        assert result.headers["content-type"] == "application/json", result.headers
        assert counting_model.predicted == [], "a replay must not compute"
        assert store.completed == [] and store.released == [], "a replay must not touch the stored record"

    def test_a_binary_replay_keeps_its_bytes_and_tensor_header(self, settings, counting_model):
        body = b'{"outputs": []}\x00\xff\x01'
        stored = {
            "state": "done",
            "status": 200,
            "body_base64": base64.b64encode(body).decode(),
            "headers": {
                "X-Request-ID": "original-id",
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": "15",
            },
        }
        client, _ = serve(settings, counting_model, Claim(Outcome.REPLAYED, "falcon:idem:order-1", stored=stored))
        result = infer(client)
        assert result.status_code == 200, result.text
        assert result.content == body
        assert result.headers["content-type"] == "application/octet-stream", result.headers
        assert result.headers["inference-header-content-length"] == "15", result.headers

    def test_a_record_stored_without_content_type_replays_as_json(self, settings, counting_model):
        stored = {"state": "done", "status": 200, "body": "{}", "headers": {"X-Request-ID": "original-id"}}
        client, _ = serve(settings, counting_model, Claim(Outcome.REPLAYED, "falcon:idem:order-1", stored=stored))
        assert infer(client).headers["content-type"] == "application/json"

    def test_without_the_store_the_request_is_computed_and_says_so(self, settings, counting_model):
        client, store = serve(settings, counting_model, Claim(Outcome.UNAVAILABLE))
        result = infer(client, text="pay once")
        assert result.status_code == 200, result.text
        assert result.headers.get("idempotency-status") == "unavailable", result.headers
        assert counting_model.predicted == ["pay once"]
        assert store.completed == [] and store.released == []

    def test_a_first_success_is_stored_with_its_request_id(self, settings, counting_model):
        claim = Claim(Outcome.FIRST, "falcon:idem:order-1", "fp", "token")
        client, store = serve(settings, counting_model, claim)
        body = json.dumps({"text": "pay once"}).encode()
        result = client.simulate_post("/infer", body=body, headers={**JSON, HEADER: "order-1"})
        assert result.status_code == 200, result.text
        assert store.begun == [(scoped_key("/infer", "", "order-1"), fingerprint("POST", "/infer", JSON_TYPE, body))]
        assert len(store.completed) == 1 and store.released == [], (store.completed, store.released)
        stored_claim, status, stored_body, headers = store.completed[0]
        assert (stored_claim, status, stored_body) == (claim, 200, result.content)
        assert headers == {"X-Request-ID": result.headers["x-request-id"], "Content-Type": "application/json"}

    def test_the_same_key_on_two_routes_reaches_the_store_as_two_keys(self, settings, counting_model):
        client, store = serve(settings, counting_model, Claim(Outcome.UNAVAILABLE))
        assert infer(client, key="order-1").status_code == 200
        batch = json.dumps({"texts": ["pay once"]})
        assert client.simulate_post("/infer/batch", body=batch, headers={**JSON, HEADER: "order-1"}).status_code == 200
        keys = [key for key, _ in store.begun]
        assert keys == [scoped_key("/infer", "", "order-1"), scoped_key("/infer/batch", "", "order-1")], keys
        assert keys[0] != keys[1], "one key on two routes must be two keys"

    def test_the_media_type_as_sent_is_in_the_fingerprint(self, settings, counting_model):
        client, store = serve(settings, counting_model, Claim(Outcome.UNAVAILABLE))
        body = json.dumps({"text": "pay once"}).encode()
        content_type = "Application/JSON; charset=UTF-8"
        result = client.simulate_post("/infer", body=body, headers={"Content-Type": content_type, HEADER: "order-1"})
        assert result.status_code == 200, result.text
        [(_, sent)] = store.begun
        assert sent == fingerprint("POST", "/infer", content_type, body), "the fingerprint must cover the media type"
        assert sent != fingerprint("POST", "/infer", JSON_TYPE, body)

    def test_the_binary_header_length_is_in_the_fingerprint(self, settings, counting_model):
        client, store = serve(settings, counting_model, Claim(Outcome.UNAVAILABLE))
        header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["pay"]}]})
        body = header.encode()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(body))}
        path = f"/v2/models/{counting_model.name}/infer"
        assert client.simulate_post(path, body=body, headers={**headers, HEADER: "bin-1"}).status_code == 200
        [(_, sent)] = store.begun
        assert sent == fingerprint("POST", path, headers["Content-Type"], body, header_length=str(len(body)))

    def test_the_client_scope_is_read_from_the_request_context(self, settings):
        """The seam for API keys: whatever authentication puts in ``req.context.client_id`` scopes the key."""

        class Authentication:
            """Stands in for the authentication to come: names the client from a test header."""

            def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
                req.context.client_id = req.get_header("X-Test-Client") or ""

        class Echo:
            def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
                resp.media = {"ok": True}

        store = FakeStore(Claim(Outcome.UNAVAILABLE))
        app = falcon.App(middleware=[Authentication(), IdempotencyMiddleware(store, settings)])
        app.add_route("/things", Echo())
        client = falcon.testing.TestClient(app)
        for name in ("client-a", "client-b", None):
            headers = {**JSON, HEADER: "order-1", **({"X-Test-Client": name} if name else {})}
            assert client.simulate_post("/things", body="{}", headers=headers).status_code == 200
        keys = [key for key, _ in store.begun]
        expected = [scoped_key("/things", scope, "order-1") for scope in ("client-a", "client-b", "")]
        assert keys == expected, keys

    def test_a_first_request_that_fails_releases_its_key(self, settings, counting_model):
        claim = Claim(Outcome.FIRST, "falcon:idem:order-1", "fp", "token")
        client, store = serve(settings, counting_model, claim)
        assert infer(client, text="   ").status_code == 422
        assert store.released == [claim] and store.completed == [], (store.released, store.completed)

    @pytest.mark.parametrize("key", ["", "has space", "x" * 256, "caf\u00e9"])
    def test_a_bad_key_is_a_400_before_the_store_is_asked(self, settings, counting_model, key):
        client, store = serve(settings, counting_model, Claim(Outcome.FIRST, "k", "fp", "token"))
        assert_refused(infer(client, key=key), 400, "invalid_idempotency_key")
        assert store.begun == []

    def test_without_the_header_the_store_is_not_asked(self, settings, counting_model):
        client, store = serve(settings, counting_model, Claim(Outcome.CONFLICT, "k"))
        assert infer(client, key=None).status_code == 200
        assert store.begun == []


class TestResponseCap:
    """``IDEMPOTENCY_MAX_RESPONSE_BYTES``: a larger reply is answered, not stored, and the key released."""

    CAP = 1024

    @staticmethod
    def infer_v2(client: falcon.testing.TestClient, model: CountingModel, count: int) -> falcon.testing.Result:
        """An OIP request with its own id: its reply has the same length every time (no timings in it)."""
        tensor = {"name": "text", "datatype": "BYTES", "shape": [count], "data": [f"text {i}" for i in range(count)]}
        body = json.dumps({"id": "order", "inputs": [tensor]})
        return client.simulate_post(f"/v2/models/{model.name}/infer", body=body, headers={**JSON, HEADER: "order-1"})

    def test_a_reply_over_the_cap_is_answered_not_stored_and_says_so(self, settings, counting_model):
        claim = Claim(Outcome.FIRST, "falcon:idem:order-1", "fp", "token")
        client, store = serve(replace(settings, idempotency_max_response_bytes=self.CAP), counting_model, claim)
        result = self.infer_v2(client, counting_model, 20)
        assert result.status_code == 200, result.text
        assert len(result.content) > self.CAP, "the test needs a reply over the cap"
        assert result.headers.get("idempotency-status") == "not-stored", result.headers
        assert store.completed == [], "a reply over the cap must not be stored"
        assert store.released == [claim], "the key must be released, so a retry is computed rather than a 409"

    def test_a_reply_at_the_cap_is_stored(self, settings, counting_model):
        claim = Claim(Outcome.FIRST, "falcon:idem:order-1", "fp", "token")
        client, _ = serve(settings, counting_model, claim)
        size = len(self.infer_v2(client, counting_model, 3).content)
        client, store = serve(replace(settings, idempotency_max_response_bytes=size), counting_model, claim)
        result = self.infer_v2(client, counting_model, 3)
        assert len(result.content) == size, "the same reply, byte for byte in length"
        assert "idempotency-status" not in result.headers, result.headers
        assert len(store.completed) == 1 and store.released == [], (store.completed, store.released)
