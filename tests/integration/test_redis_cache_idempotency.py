"""Response cache and idempotency against a real redis-server, including Redis dying mid-run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import falcon.testing
import pytest
import redis
from prometheus_client import REGISTRY
from servers import RedisServer

from falcon_svc.app import create_app
from falcon_svc.cache import ResponseCache, cache_key
from falcon_svc.dependencies import Dependencies, build_redis_dependencies, make_redis_client
from falcon_svc.idempotency import KEY_PREFIX, IdempotencyStore, Outcome
from falcon_svc.inference import text_digest
from falcon_svc.model import Model, Prediction
from falcon_svc.resilience import CircuitBreaker, State
from falcon_svc.settings import Settings
from falcon_svc.text import normalize

pytestmark = pytest.mark.integration
JSON = {"Content-Type": "application/json"}
PREDICTION = Prediction("positive", 0.9, {"negative": 0.05, "neutral": 0.05, "positive": 0.9})


@pytest.fixture
def redis_settings(settings: Settings, redis_server: RedisServer) -> Settings:
    # Every text goes to Redis here (production skips it for short texts).
    return replace(settings, redis_url=redis_server.url, circuit_breaker_timeout_seconds=1, cache_redis_min_chars=0)


_BUILT: list[Dependencies] = []


@pytest.fixture(autouse=True)
def _close_built_dependencies() -> Iterator[None]:
    """Stop what each test's apps started (Redis recovery probes) when the test ends."""
    yield
    while _BUILT:
        _BUILT.pop().close(timeout=1.0)


def build(
    settings: Settings, model: Model, version: str | None = None
) -> tuple[falcon.testing.TestClient, Dependencies]:
    """A fresh app (empty local cache tier) on the shared Redis."""
    deps = Dependencies()
    build_redis_dependencies(settings, version or model.version, deps)
    _BUILT.append(deps)
    return falcon.testing.TestClient(create_app(settings, model, dependencies=deps, worker_id="t:1")), deps


def infer(client, text: str, key: str | None = None) -> falcon.testing.Result:
    headers = {**JSON, **({"X-Idempotency-Key": key} if key else {})}
    return client.simulate_post("/infer", body=json.dumps({"text": text}), headers=headers)


def wait_for_keys(server: RedisServer, count: int, within: float = 10.0) -> None:
    """The cache writes to Redis from a background thread: wait until it has."""
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + within
    while len(client.keys("falcon:cache:*")) < count:
        assert time.monotonic() < deadline, f"expected {count} cache keys, found {client.keys('falcon:cache:*')}"
        time.sleep(0.02)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def cache_errors(reason: str) -> float:
    return sample("falcon_cache_errors_total", reason=reason)


def redis_calls_timed(operation: str) -> float:
    return sample("falcon_dependency_call_duration_seconds_count", dependency="redis", operation=operation)


def wait_until(condition, what: str, within: float = 10.0) -> None:
    """The cache writes from a background thread: wait for its effect, not for a time."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def cache_key_of(model: Model, text: str) -> bytes:
    """The Redis key the cache stores ``text``'s prediction under."""
    return cache_key("falcon:cache", model.version, text_digest(normalize(text))).encode()


def wait_for_key(server: RedisServer, key: bytes, within: float = 10.0) -> None:
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + within
    while not client.exists(key):
        assert time.monotonic() < deadline, f"{key!r} never reached Redis; keys: {client.keys('falcon:cache:*')}"
        time.sleep(0.02)


class TestCache:
    def test_second_identical_request_is_a_hit_from_redis(self, redis_settings, model, redis_server):
        first, _ = build(redis_settings, model)
        assert infer(first, "The room was spotless").json["cache_hit"] is False
        wait_for_keys(redis_server, 1)
        # Another worker (empty local tier) gets Redis's answer; whitespace differences normalise away.
        second, _ = build(redis_settings, model)
        body = infer(second, "  The room   was spotless ").json
        assert body["cache_hit"] is True
        assert body["probabilities"] == infer(first, "The room was spotless").json["probabilities"]

    def test_repeat_in_the_same_worker_is_a_local_hit(self, redis_settings, model):
        client, _ = build(redis_settings, model)
        assert infer(client, "fast answer").json["cache_hit"] is False
        assert infer(client, "fast answer").json["cache_hit"] is True

    def test_new_model_version_never_serves_old_answers(self, redis_settings, model, redis_server):
        old, _ = build(redis_settings, model, version="v-old")
        infer(old, "versioned text")
        wait_for_keys(redis_server, 1)
        new, _ = build(redis_settings, model, version="v-new")
        assert infer(new, "versioned text").json["cache_hit"] is False

    def test_batch_reports_hits_per_item(self, redis_settings, model, redis_server):
        client, _ = build(redis_settings, model)
        infer(client, "already seen")
        wait_for_keys(redis_server, 1)
        fresh, _ = build(redis_settings, model)
        result = fresh.simulate_post(
            "/infer/batch", body=json.dumps({"texts": ["already seen", "never seen", "already seen"]}), headers=JSON
        )
        assert [item["cache_hit"] for item in result.json["results"]] == [True, False, True]

    def test_lost_operations_are_counted_by_reason_and_attempts_timed(self, redis_settings, redis_server):
        breaker = CircuitBreaker("redis", failure_threshold=2, reset_timeout=60)
        cache = ResponseCache(make_redis_client(redis_settings), breaker, model_version="v", ttl_seconds=60)
        mgets, errors = redis_calls_timed("mget"), cache_errors("ConnectionError")
        assert cache.get_many(["a", "b", "c"]) == [None] * 3
        assert redis_calls_timed("mget") == mgets + 1, "every MGET sent is timed"
        assert cache_errors("ConnectionError") == errors

        redis_server.stop()
        sets = redis_calls_timed("set")
        assert cache.get_many(["d", "e", "f"]) == [None] * 3
        assert cache_errors("ConnectionError") == errors + 1, "a failed read counts once, whatever its keys"
        assert redis_calls_timed("mget") == mgets + 2, "a failed MGET is timed too"
        cache.put_many(["d", "e"], [PREDICTION, PREDICTION])
        wait_until(lambda: cache_errors("ConnectionError") == errors + 3, "a failed write counts each SET lost")
        assert redis_calls_timed("set") == sets + 1, "a failed pipeline is timed once"
        assert breaker.state is State.OPEN

        refused = cache_errors("circuit_open")
        assert cache.get_many(["g", "h"]) == [None, None]
        assert cache_errors("circuit_open") == refused + 1, "a refused read counts once"
        cache.put_many(["g", "h", "i"], [PREDICTION] * 3)
        wait_until(lambda: cache_errors("circuit_open") == refused + 4, "a refused write counts each SET dropped")
        assert redis_calls_timed("mget") == mgets + 2, "a refused call is not timed: it never left the worker"
        assert redis_calls_timed("set") == sets + 1

    def test_short_texts_skip_redis_by_default(self, redis_settings, model, redis_server):
        client, _ = build(replace(redis_settings, cache_redis_min_chars=256), model)
        long_text = "A long review that is well worth a round trip to Redis. " * 6
        assert infer(client, "short text").status_code == 200
        assert infer(client, long_text).status_code == 200
        # NOTE: the cache's one writer thread sends its queue to Redis in order, so once
        # the long text (answered second) is there, a short text sent to Redis would be too.
        wait_for_key(redis_server, cache_key_of(model, long_text))
        stored = redis.Redis.from_url(redis_server.url).keys("falcon:cache:*")
        assert stored == [cache_key_of(model, long_text)], f"only the long text belongs in Redis: {stored}"
        fresh, _ = build(replace(redis_settings, cache_redis_min_chars=256), model)
        assert infer(fresh, long_text).json["cache_hit"] is True
        assert infer(fresh, "short text").json["cache_hit"] is False


class TestIdempotency:
    def test_replay_returns_the_stored_response(self, redis_settings, model):
        client, _ = build(redis_settings, model)
        first = infer(client, "pay once", key="order-1")
        replay = infer(client, "pay once", key="order-1")
        assert first.status_code == replay.status_code == 200
        assert replay.headers.get("idempotent-replayed") == "true"
        assert "idempotent-replayed" not in first.headers
        assert replay.json == first.json, "the replay must be the stored response, as it was"
        assert replay.headers["x-request-id"] == first.headers["x-request-id"] == first.json["request_id"]

    def test_a_binary_oip_reply_is_replayed_byte_for_byte(self, redis_settings, model):
        # tritonclient asks for binary tensors by default when it names no outputs.
        client, _ = build(redis_settings, model)
        request = {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["charge me once"]}],
            "parameters": {"binary_data_output": True},
        }

        def send() -> falcon.testing.Result:
            return client.simulate_post(
                f"/v2/models/{model.name}/infer", body=json.dumps(request), headers={"X-Idempotency-Key": "bin-1"}
            )

        first, replay = send(), send()
        assert first.status_code == replay.status_code == 200, first.text
        assert replay.headers.get("idempotent-replayed") == "true", replay.headers
        assert first.headers["content-type"] == "application/octet-stream", first.headers
        assert replay.content == first.content, "the replay must be the stored bytes, as they were"
        for header in ("content-type", "inference-header-content-length"):
            assert replay.headers[header] == first.headers[header], header

    def test_same_key_other_body_is_422(self, redis_settings, model):
        client, _ = build(redis_settings, model)
        infer(client, "first body", key="order-2")
        result = infer(client, "second body", key="order-2")
        assert result.status_code == 422, result.text
        assert result.json["error"]["code"] == "idempotency_key_mismatch"

    def test_canonical_body_matches_despite_key_order(self, redis_settings, model):
        client, _ = build(redis_settings, model)
        a = client.simulate_post(
            "/infer/batch", body='{"texts": ["x"], "z": 1}', headers={**JSON, "X-Idempotency-Key": "k3"}
        )
        b = client.simulate_post(
            "/infer/batch", body='{ "z":1, "texts":["x"] }', headers={**JSON, "X-Idempotency-Key": "k3"}
        )
        assert b.headers.get("idempotent-replayed") == "true" and a.json == b.json

    @pytest.mark.parametrize("key", ["", "has space", "x" * 256, "caf\u00e9"])
    def test_bad_key_is_400(self, redis_settings, model, key):
        client, _ = build(redis_settings, model)
        result = (
            infer(client, "text", key=key)
            if key
            else client.simulate_post("/infer", body='{"text": "t"}', headers={**JSON, "X-Idempotency-Key": ""})
        )
        assert result.status_code == 400, result.text
        assert result.json["error"]["code"] == "invalid_idempotency_key"

    def test_a_retry_through_nginx_of_a_request_whose_unit_died_is_answered(self, redis_settings, model, redis_server):
        client, _ = build(redis_settings, model)
        proxied = f"{'d' * 32} {time.time():.3f}"
        headers = {**JSON, "X-Idempotency-Key": "order-13", "X-Falcon-Proxy-Request": proxied}
        body = json.dumps({"text": "charge my card"})
        # The first attempt claimed the key, as the middleware does, and its unit died.
        first = client.simulate_post("/infer", body=body, headers=headers)
        assert first.status_code == 200
        raw = redis.Redis.from_url(redis_server.url)
        (key,) = raw.keys(f"{KEY_PREFIX}:*")
        done = json.loads(raw.get(key))
        raw.set(key, json.dumps({"state": "pending", "fp": done["fp"], "token": "dead", "attempt": "d" * 32}))

        retried = client.simulate_post("/infer", body=body, headers=headers)
        assert retried.status_code == 200, retried.text
        other = {**headers, "X-Falcon-Proxy-Request": f"{'e' * 32} {time.time():.3f}"}
        raw.set(key, json.dumps({"state": "pending", "fp": done["fp"], "token": "live", "attempt": "d" * 32}))
        conflict = client.simulate_post("/infer", body=body, headers=other)
        assert conflict.status_code == 409, "another client request under the key still waits for the first"

    def test_failed_request_releases_the_key(self, redis_settings, model):
        client, _ = build(redis_settings, model)
        assert infer(client, "   ", key="order-4").status_code == 422
        assert infer(client, "now valid", key="order-4").status_code == 200

    def test_concurrent_duplicates_compute_once(self, redis_settings, model):
        duplicates = 5
        release = threading.Event()
        computing = threading.Event()
        computed: list[list[str]] = []
        results: list[falcon.testing.Result] = []
        # NOTE: notified whenever a request either gets its answer or reaches the
        # model, so the test waits for exactly that instead of sleeping.
        progress = threading.Condition()

        class HeldModel:
            """Our model interface, held inside predict until the test releases it."""

            def __getattr__(self, name):
                return getattr(model, name)

            def predict(self, texts):
                with progress:
                    computed.append(list(texts))
                    progress.notify_all()
                computing.set()
                release.wait(30)
                return model.predict(texts)

        client, _ = build(redis_settings, HeldModel())

        def send():
            result = infer(client, "charge my card", key="order-5")
            with progress:
                results.append(result)
                progress.notify_all()

        threads = [threading.Thread(target=send) for _ in range(1 + duplicates)]
        threads[0].start()
        try:
            assert computing.wait(10), "the first request never reached the model"
            for thread in threads[1:]:
                thread.start()
            with progress:
                # Each duplicate is either answered or (wrongly) computing too.
                settled = progress.wait_for(lambda: len(results) + len(computed) - 1 >= duplicates, timeout=30)
                answered_while_held = list(results)
                computed_while_held = len(computed)
        finally:
            release.set()
            for thread in threads:
                thread.join(30)
        assert settled, f"duplicates neither answered nor computed: {len(results)} answers, {len(computed)} runs"
        assert computed_while_held == 1, f"the model ran {computed_while_held} times for one idempotency key"
        assert [r.status_code for r in answered_while_held] == [409] * duplicates, [
            (r.status_code, r.text) for r in answered_while_held
        ]
        for conflict in answered_while_held:
            assert conflict.headers.get("retry-after") == "1", conflict.headers
            assert conflict.json["error"]["code"] == "idempotency_key_in_flight", conflict.json
        assert sorted(r.status_code for r in results) == [200] + [409] * duplicates
        assert len(computed) == 1, f"the model ran {len(computed)} times"
        replay = infer(client, "charge my card", key="order-5")
        assert replay.headers.get("idempotent-replayed") == "true", replay.headers
        assert len(computed) == 1, "a replay must not compute"


class TestIdempotencyStore:
    """The store on its own, against real Redis: the claim is atomic and a late finisher cannot clobber."""

    @staticmethod
    def store(redis_server: RedisServer) -> IdempotencyStore:
        return IdempotencyStore(
            redis.Redis.from_url(redis_server.url),
            CircuitBreaker("redis", failure_threshold=5, reset_timeout=60),
            ttl_seconds=60,
            lock_seconds=30,
        )

    def test_simultaneous_claims_have_exactly_one_winner(self, redis_server):
        store = self.store(redis_server)
        claimants = 8
        barrier = threading.Barrier(claimants)
        outcomes: list[Outcome] = []

        def claim() -> None:
            barrier.wait(10)
            outcomes.append(store.begin("order-7", "fingerprint").outcome)

        threads = [threading.Thread(target=claim) for _ in range(claimants)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(o.value for o in outcomes) == sorted(["first"] + ["conflict"] * (claimants - 1)), outcomes

    def test_an_open_breaker_refuses_claims_but_not_their_release_or_completion(self, redis_server):
        # NOTE: a claim left pending would answer 409 for IDEMPOTENCY_LOCK_SECONDS.
        breaker = CircuitBreaker("redis", failure_threshold=1, reset_timeout=60)
        store = IdempotencyStore(redis.Redis.from_url(redis_server.url), breaker, ttl_seconds=60, lock_seconds=30)
        raw = redis.Redis.from_url(redis_server.url)
        claims_timed = redis_calls_timed("idempotency_claim")
        released, completed = store.begin("order-9", "fp"), store.begin("order-10", "fp")
        assert released.outcome is completed.outcome is Outcome.FIRST
        assert redis_calls_timed("idempotency_claim") == claims_timed + 2

        breaker.record_failure()
        assert store.begin("order-11", "fp").outcome is Outcome.UNAVAILABLE, "an open breaker refuses new claims"
        assert redis_calls_timed("idempotency_claim") == claims_timed + 2, "a refused claim never left the worker"
        assert raw.exists(released.key) and released.key == f"{KEY_PREFIX}:order-9", released.key
        assert not raw.exists(f"{KEY_PREFIX}:order-11")

        store.release(released)
        assert not raw.exists(released.key), "the release must go through an open breaker"
        assert breaker.state is State.CLOSED, "and its success is recorded"
        breaker.record_failure()
        store.complete(completed, 200, b"{}", {})
        assert json.loads(raw.get(completed.key))["state"] == "done", "the completion must go through an open breaker"

    def test_nginx_s_retry_of_the_same_request_takes_over_a_claim_its_dead_first_attempt_left(self, redis_server):
        # A unit SIGKILLed after claiming the key: nginx sends the same client request
        # (the same request id) to another unit, which must not answer 409.
        store = self.store(redis_server)
        attempt = "a" * 32
        dead = store.begin("order-12", "fp", attempt_of=attempt)
        assert dead.outcome is Outcome.FIRST
        assert store.begin("order-12", "fp", attempt_of="b" * 32).outcome is Outcome.CONFLICT, "another request"
        assert store.begin("order-12", "fp").outcome is Outcome.CONFLICT, "a request that came without nginx"
        assert store.begin("order-12", "other fp", attempt_of=attempt).outcome is Outcome.MISMATCH

        retry = store.begin("order-12", "fp", attempt_of=attempt)
        assert retry.outcome is Outcome.FIRST and retry.token != dead.token, retry
        store.complete(dead, 200, b'{"from": "dead"}', {})  # it was not dead after all: too late
        assert store.begin("order-12", "fp", attempt_of="c" * 32).outcome is Outcome.CONFLICT
        store.complete(retry, 200, b'{"from": "retry"}', {})
        again = store.begin("order-12", "fp", attempt_of=attempt)
        assert again.outcome is Outcome.REPLAYED and again.stored is not None, "a done answer is never recomputed"
        assert again.stored["body"] == '{"from": "retry"}', again.stored

    def test_a_late_finisher_does_not_overwrite_the_next_claim(self, redis_server):
        store = self.store(redis_server)
        late = store.begin("order-8", "fingerprint")
        assert late.outcome is Outcome.FIRST
        redis.Redis.from_url(redis_server.url).delete(late.key)  # the lock expired while it computed
        current = store.begin("order-8", "fingerprint")
        assert current.outcome is Outcome.FIRST, "an expired claim must be claimable again"

        store.complete(late, 200, b'{"from": "late"}', {})
        assert store.begin("order-8", "fingerprint").outcome is Outcome.CONFLICT, "the late finisher took over"
        store.complete(current, 200, b'{"from": "current"}', {})
        replay = store.begin("order-8", "fingerprint")
        assert replay.outcome is Outcome.REPLAYED and replay.stored is not None
        assert replay.stored["body"] == '{"from": "current"}', replay.stored

    @pytest.mark.parametrize("applied", [False, True], ids=["lost", "applied-but-timed-out"])
    def test_an_answer_redis_did_not_store_frees_the_claim_and_is_counted(self, redis_server, applied):
        # NOTE: under load a completion can outlast REDIS_TIMEOUT_MS; left pending, the
        # key would answer 409 to every retry for IDEMPOTENCY_LOCK_SECONDS.
        store = self.store(redis_server)
        claim = store.begin("order-13", "fp")
        complete = store._complete

        def timed_out(**kwargs: object) -> None:
            if applied:
                complete(**kwargs)  # Redis stored it; the reply came too late
            raise redis.TimeoutError("Timeout reading from socket")

        store._complete = timed_out
        unrecorded = idempotency_outcomes("unrecorded")
        store.complete(claim, 200, b'{"label": "positive"}', {})
        assert idempotency_outcomes("unrecorded") == unrecorded + 1
        again = store.begin("order-13", "fp")
        if applied:
            assert again.outcome is Outcome.REPLAYED, "a stored answer is never released"
        else:
            assert again.outcome is Outcome.FIRST, "a retry runs again rather than 409"


def idempotency_outcomes(outcome: str) -> float:
    return REGISTRY.get_sample_value("falcon_idempotency_requests_total", {"outcome": outcome}) or 0.0


def test_redis_killed_mid_run_then_back(redis_settings, model, redis_server):
    client, deps = build(redis_settings, model)
    breaker = deps.breakers["redis"]
    infer(client, "before the outage")
    wait_for_keys(redis_server, 1)

    redis_server.stop()
    for i in range(20):
        result = infer(client, f"during the outage {i}", key=f"k-{i}")
        assert result.status_code == 200, result.text
        assert result.json["cache_hit"] is False
        assert result.headers.get("idempotency-status") == "unavailable"
    assert breaker.state is State.OPEN
    ready = client.simulate_get("/readyz")
    assert ready.status_code == 200 and ready.json["degraded"] == ["redis"], ready.json

    redis_server.start()
    time.sleep(1.1)  # the test breaker's open timeout is 1 s
    # The worker's recovery probe may already have taken the half-open trial and closed it.
    assert breaker.state in {State.HALF_OPEN, State.CLOSED}
    assert infer(client, "after the outage").status_code == 200
    assert breaker.state is State.CLOSED
    wait_for_keys(redis_server, 1)  # caching resumed (the old server's keys died with it)
    fresh, _ = build(redis_settings, model)
    assert infer(fresh, "after the outage").json["cache_hit"] is True
