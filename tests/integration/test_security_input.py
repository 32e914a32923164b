"""Inputs that cost the server far more than they cost the client, over a real socket to real gunicorn.

Issue 11: combining marks that made NFKC quadratic (findings 1), OIP outputs
and idempotent replies that multiplied a request's size in the reply and in
Redis (finding 2), and idempotency keys shared across routes and media types
(finding 8). The assertions are on behaviour (the status and code, what
reached the cache, what Redis holds), never on time: the machine is noisy.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from servers import RedisServer
from test_gunicorn_serving import call, free_port, running_service, service_env

from falcon_svc.model import Model

pytestmark = pytest.mark.integration

ACUTE, GRAVE_BELOW, TIBETAN_II, CGJ = "\u0301", "\u0316", "\u0f73", "\u034f"
RESPONSE_CAP = 1024


def marked(base: str, count: int) -> str:
    """``base`` and ``2 * count - 1`` combining marks in non-canonical order: the issue's shape."""
    return base + ACUTE * count + GRAVE_BELOW * (count - 1)


def expected_stream_safe(base: str, marks: str, non_starters_each: int) -> str:
    """What normalising must give: a U+034F after every 30 non-starters, then NFKC (cheap on that).

    Built here from UAX #15, not with falcon_svc.text, so the service is checked
    against the standard rather than against itself.
    """
    per_stretch = 30 // non_starters_each
    stretches = [marks[index : index + per_stretch] for index in range(0, len(marks), per_stretch)]
    return unicodedata.normalize("NFKC", base + CGJ.join(stretches))


def cache_key(model: Model, normalised: str) -> str:
    return f"falcon:cache:{model.version}:{hashlib.sha256(normalised.encode()).hexdigest()}"


def idempotency_record(path: str, key: str) -> str:
    """Where Redis keeps ``key``'s record for ``path``, as documented in falcon_svc/idempotency.py.

    Built here, not with ``scoped_key``, so the layout is checked rather than echoed.
    The client scope is empty until API keys exist.
    """
    return f"falcon:idem2:{hashlib.sha256(path.encode()).hexdigest()}::{key}"


def wait_for_key(client: redis.Redis, key: str, within: float = 10.0) -> None:
    """The cache writes to Redis from a background thread: wait for the key, not for a time."""
    deadline = time.monotonic() + within
    while not client.exists(key):
        assert time.monotonic() < deadline, f"{key} never reached Redis: the text was not normalised Stream-Safe"
        time.sleep(0.02)


def post_raw(port: int, path: str, data: bytes, headers: dict[str, str] | None = None):
    """POST ``data`` as it is (``call`` would re-encode it); return (status, headers, raw body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.headers, ex.read()


def error_of(reply: dict) -> tuple[str, str, str | None]:
    """Return (code, message, field) of an error in our shape or in OIP's (under /v2)."""
    error = reply["error"]
    if isinstance(error, str):
        return reply["code"], error, reply["field"]
    return error["code"], error["message"], error["field"]


@pytest.fixture
def service(dummy_model_dir: Path, tmp_path: Path, redis_server: RedisServer) -> Iterator[int]:
    """One gunicorn master on a real Redis; every text goes to Redis, and idempotent replies are capped at 1 KiB."""
    port = free_port()
    env = service_env(
        dummy_model_dir,
        port,
        tmp_path,
        WORKERS="1",
        REDIS_URL=redis_server.url,
        CACHE_REDIS_MIN_CHARS="0",
        IDEMPOTENCY_MAX_RESPONSE_BYTES=str(RESPONSE_CAP),
    )
    with running_service(env, tmp_path / "service.log"):
        yield port


def test_combining_marks_are_normalised_stream_safe_on_every_route(service, model: Model, redis_server):
    store = redis.Redis.from_url(redis_server.url)
    single, batched, tibetan, over_v2 = marked("a", 2400), marked("e", 2400), "x" + TIBETAN_II * 2000, marked("o", 2400)

    status, _, body = call(service, "POST", "/infer", {"text": single})
    assert status == 200, body
    status, _, body = call(service, "POST", "/infer/batch", {"texts": [batched, tibetan]})
    assert status == 200 and body["count"] == 2, body
    tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [over_v2]}
    status, _, body = call(service, "POST", f"/v2/models/{model.name}/infer", {"inputs": [tensor]})
    assert status == 200, body

    for base, text in (("a", single), ("e", batched), ("o", over_v2)):
        wait_for_key(store, cache_key(model, expected_stream_safe(base, text[1:], 1)))
    # U+0F73 decomposes into two non-starters: a joiner after every 15.
    wait_for_key(store, cache_key(model, expected_stream_safe("x", tibetan[1:], 2)))


def test_the_issues_text_is_refused_before_it_is_normalised(service, model: Model):
    """The issue's 20,000-character text (0.65 s of NFKC before) is a 422 on its raw length, on every route."""
    text = marked("a", 10_000)
    v2_tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}
    for path, body, field in (
        ("/infer", {"text": text}, "text"),
        ("/infer/batch", {"texts": ["fine", text]}, "texts[1]"),
        (f"/v2/models/{model.name}/infer", {"inputs": [v2_tensor]}, "inputs[0].data[0]"),
    ):
        status, _, reply = call(service, "POST", path, body)
        assert status == 422, (path, reply)
        code, message, named = error_of(reply)
        assert (code, named) == ("invalid_input", field), reply
        assert message.endswith(" before."), f"{path}: refused after normalising, not before: {message}"


def test_repeated_outputs_are_a_400_answered_in_a_few_bytes(service, model: Model):
    """The issue's request: 80,000 copies of one output and 50 texts, 2 MB in (251 MiB came out)."""
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [50], "data": ["a fine day"] * 50}]
    body = {"inputs": inputs, "outputs": [{"name": "probabilities"}] * 80_000}
    data = json.dumps(body, separators=(",", ":")).encode()
    assert len(data) > 1_900_000, "the request must be the issue's size"
    status, _, raw = post_raw(service, f"/v2/models/{model.name}/infer", data)
    assert status == 400, raw[:300]
    code, _, field = error_of(json.loads(raw))
    assert (code, field) == ("invalid_request", "outputs[1].name"), raw
    assert len(raw) < 1024, f"a {len(raw)}-byte answer to a refused request"

    # Refused before the texts are normalised: a text over the raw bound does not get its 422 first.
    tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [marked("a", 10_000)]}
    body = {"inputs": [tensor], "outputs": [{"name": "probabilities"}] * 2}
    status, _, reply = call(service, "POST", f"/v2/models/{model.name}/infer", body)
    assert status == 400 and error_of(reply)[0] == "invalid_request", reply


def test_an_idempotent_reply_over_the_cap_is_answered_but_not_stored(service, redis_server):
    store = redis.Redis.from_url(redis_server.url)
    batch = {"texts": [f"order line {index} arrived broken" for index in range(10)]}

    status, headers, first = call(service, "POST", "/infer/batch", batch, headers={"X-Idempotency-Key": "big-1"})
    assert status == 200, first
    assert len(json.dumps(first)) > RESPONSE_CAP, "the test needs a reply over the cap"
    assert headers.get("Idempotency-Status") == "not-stored", dict(headers)
    assert not store.exists(idempotency_record("/infer/batch", "big-1")), (
        "a reply over the cap must leave nothing in Redis"
    )

    status, headers, again = call(service, "POST", "/infer/batch", batch, headers={"X-Idempotency-Key": "big-1"})
    assert status == 200, again
    assert headers.get("Idempotent-Replayed") is None, "nothing was stored, so nothing can be replayed"
    assert again["request_id"] != first["request_id"], "the retry must be computed again"

    # The control: a reply under the cap is stored and replayed, so the check above can fail.
    status, headers, small = call(service, "POST", "/infer", {"text": "fine"}, headers={"X-Idempotency-Key": "small-1"})
    assert status == 200 and headers.get("Idempotency-Status") is None, (small, dict(headers))
    assert json.loads(store.get(idempotency_record("/infer", "small-1")))["state"] == "done"
    status, headers, replay = call(
        service, "POST", "/infer", {"text": "fine"}, headers={"X-Idempotency-Key": "small-1"}
    )
    assert headers.get("Idempotent-Replayed") == "true" and replay["request_id"] == small["request_id"], replay


def test_one_idempotency_key_on_two_routes_is_two_requests(service, redis_server):
    """Keys are scoped per route: the same key on /infer and /infer/batch computes, stores and replays each."""
    store = redis.Redis.from_url(redis_server.url)
    key = {"X-Idempotency-Key": "shared-1"}
    requests = (("/infer", {"text": "ship it today"}), ("/infer/batch", {"texts": ["ship it today"]}))

    answers = {}
    for path, body in requests:
        status, headers, answers[path] = call(service, "POST", path, body, headers=key)
        assert status == 200, f"{path}: the other route's use of the key must not refuse this one: {answers[path]}"
        assert headers.get("Idempotent-Replayed") is None, f"{path} was replayed, not computed"
    assert answers["/infer"]["request_id"] != answers["/infer/batch"]["request_id"]
    for path, _ in requests:
        record = store.get(idempotency_record(path, "shared-1"))
        assert record is not None and json.loads(record)["state"] == "done", f"{path}: no record of its own"

    for path, body in requests:
        status, headers, again = call(service, "POST", path, body, headers=key)
        assert status == 200 and headers.get("Idempotent-Replayed") == "true", (path, again)
        assert again["request_id"] == answers[path]["request_id"], f"{path} replayed another route's answer"


def test_the_same_key_and_body_with_another_content_type_is_not_replayed(service):
    """The fingerprint covers the media type: another one under the key is a 422, never the stored answer."""
    data = json.dumps({"text": "charge my card once"}).encode()
    key = {"X-Idempotency-Key": "typed-1"}
    status, _, raw = post_raw(service, "/infer", data, key)
    assert status == 200, raw
    first = json.loads(raw)

    # The control: the same media type spelt otherwise is the same request, and is replayed.
    status, headers, raw = post_raw(service, "/infer", data, {**key, "Content-Type": "Application/JSON"})
    assert status == 200 and headers.get("Idempotent-Replayed") == "true", (status, raw)
    assert json.loads(raw)["request_id"] == first["request_id"]

    status, headers, raw = post_raw(service, "/infer", data, {**key, "Content-Type": "text/plain"})
    assert headers.get("Idempotent-Replayed") is None, "a request with another Content-Type got the stored answer"
    assert status == 422, raw
    code, _, field = error_of(json.loads(raw))
    assert (code, field) == ("idempotency_key_mismatch", "X-Idempotency-Key"), raw
