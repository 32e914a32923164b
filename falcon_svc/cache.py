"""Cache predictions: a small in-process LRU in front of Redis.

Key: prefix + model version + sha256 of the normalised text, so a new model
version never serves an old version's answers. Value: the prediction only (no
per-request fields).

Why two tiers: a Redis round trip on loopback costs about as much as the
compiled model itself (~50 us), so Redis alone would make a hit no cheaper than
inference; the in-process tier answers repeated texts in microseconds, and Redis
shares answers between workers and hosts. Redis writes happen off the request
path (a background thread pipelines them), and every Redis error or an open
breaker is a miss, never a wait or a 5xx.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import redis

from falcon_svc import metrics
from falcon_svc.model import Prediction
from falcon_svc.resilience import CircuitBreaker

logger = logging.getLogger(__name__)

_WRITE_QUEUE_MAX = 10_000
_WRITE_BATCH_MAX = 200
_WRITE_INTERVAL = 0.05


def cache_key(prefix: str, model_version: str, digest: str) -> str:
    """Return the cache key of a normalised text (by its sha256) under ``model_version``."""
    return f"{prefix}:{model_version}:{digest}"


def encode(prediction: Prediction) -> bytes:
    return json.dumps(
        {"label": prediction.label, "confidence": prediction.confidence, "probabilities": prediction.probabilities},
        separators=(",", ":"),
    ).encode()


def decode(raw: bytes) -> Prediction:
    value = json.loads(raw)
    return Prediction(value["label"], value["confidence"], value["probabilities"])


class LocalLRU:
    """A bounded, expiring, thread-safe map: the in-process tier."""

    def __init__(self, max_items: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_items
        self._ttl = ttl
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Prediction]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Prediction | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] <= self._clock():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: str, prediction: Prediction) -> None:
        if self._max <= 0:
            return
        with self._lock:
            self._items[key] = (self._clock() + self._ttl, prediction)
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)


class ResponseCache:
    """Look predictions up in the local tier, then Redis; store them in both."""

    def __init__(
        self,
        client: redis.Redis | None,
        breaker: CircuitBreaker,
        *,
        model_version: str,
        ttl_seconds: int,
        prefix: str = "falcon:cache",
        local_items: int = 10_000,
        redis_min_chars: int = 0,
    ) -> None:
        self._client = client
        self._breaker = breaker
        self._version = model_version
        self._ttl = ttl_seconds
        self._prefix = prefix
        self._redis_min_chars = redis_min_chars
        self._local = LocalLRU(local_items, ttl_seconds)
        self._pending: list[tuple[str, bytes]] = []
        self._pending_lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def worth_asking_redis(self, total_chars: int) -> bool:
        """Tell whether a request's texts are worth a Redis round trip.

        NOTE: a loopback round trip costs Redis and the worker ~50 us of CPU each
        here, about what the compiled model spends on a short text; asking Redis
        about a short text would make a hit no cheaper than inference, and a miss
        much dearer. Short texts use the in-process tier only.
        """
        return self._client is not None and total_chars >= self._redis_min_chars

    def get_many(self, digests: Sequence[str], *, use_redis: bool = True) -> list[Prediction | None]:
        """Return the cached prediction per text digest, or None; one Redis round trip at most."""
        keys = [cache_key(self._prefix, self._version, digest) for digest in digests]
        found: list[Prediction | None] = [self._local.get(key) for key in keys]
        missing = [index for index, value in enumerate(found) if value is None]
        if missing and use_redis and self._client is not None:
            raw = self._redis_mget([keys[index] for index in missing])
            for index, value in zip(missing, raw, strict=True):
                if value is not None:
                    try:
                        prediction = decode(value)
                    except (ValueError, KeyError, TypeError):
                        # Not ours (another writer, an old format): a miss, never a 5xx.
                        metrics.CACHE_ERRORS.labels("undecodable").inc()
                        continue
                    found[index] = prediction
                    self._local.put(keys[index], prediction)
        hits = len(keys) - sum(1 for value in found if value is None)
        if hits:
            metrics.CACHE_HITS.inc(hits)
        if hits < len(keys):
            metrics.CACHE_MISSES.inc(len(keys) - hits)
        return found

    def put_many(self, digests: Sequence[str], predictions: Sequence[Prediction], *, use_redis: bool = True) -> None:
        """Store fresh predictions: locally now, in Redis (if used) from the background writer."""
        keys = [cache_key(self._prefix, self._version, digest) for digest in digests]
        for key, prediction in zip(keys, predictions, strict=True):
            self._local.put(key, prediction)
        if self._client is None or not use_redis:
            return
        encoded = [(key, encode(prediction)) for key, prediction in zip(keys, predictions, strict=True)]
        with self._pending_lock:
            room = _WRITE_QUEUE_MAX - len(self._pending)
            self._pending.extend(encoded[:room])
        if len(encoded) > room:
            metrics.CACHE_ERRORS.labels("write_queue_full").inc(len(encoded) - max(room, 0))
        self._ensure_writer()

    def _redis_mget(self, keys: list[str]) -> list[bytes | None]:
        if not self._breaker.allow():
            metrics.CACHE_ERRORS.labels("circuit_open").inc()
            return [None] * len(keys)
        started = time.perf_counter()
        try:
            # NOTE: execute_command skips mget()'s argument juggling: ~10 us a call.
            values = self._client.execute_command("MGET", *keys)
        except redis.RedisError as ex:
            self._breaker.record_failure()
            metrics.CACHE_ERRORS.labels(type(ex).__name__).inc()
            return [None] * len(keys)
        finally:
            metrics.DEPENDENCY_LATENCY.labels("redis", "mget").observe(time.perf_counter() - started)
        self._breaker.record_success()
        return values

    def _ensure_writer(self) -> None:
        # NOTE: started lazily, in the worker, after gunicorn's fork.
        if self._writer is not None and self._writer.is_alive():
            return
        with self._pending_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="cache-writer", daemon=True)
                self._writer.start()

    def _write_loop(self) -> None:
        """Every ``_WRITE_INTERVAL`` seconds, pipeline the pending SETs to Redis.

        NOTE: the thread sleeps between rounds instead of waking per write: a
        wake-up per request would take the GIL from the request thread thousands
        of times a second. A cached answer reaches Redis at most one interval late.
        """
        while True:
            time.sleep(_WRITE_INTERVAL)
            with self._pending_lock:
                batch, self._pending = self._pending, []
            for start in range(0, len(batch), _WRITE_BATCH_MAX):
                self._write_batch(batch[start : start + _WRITE_BATCH_MAX])

    def _write_batch(self, batch: list[tuple[str, bytes]]) -> None:
        if not self._breaker.allow():
            # Dropping cache writes is safe: they are an optimisation.
            metrics.CACHE_ERRORS.labels("circuit_open").inc(len(batch))
            return
        started = time.perf_counter()
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, value in batch:
                pipe.set(key, value, ex=self._ttl)
            pipe.execute()
        except redis.RedisError as ex:
            self._breaker.record_failure()
            metrics.CACHE_ERRORS.labels(type(ex).__name__).inc(len(batch))
            return
        finally:
            metrics.DEPENDENCY_LATENCY.labels("redis", "set").observe(time.perf_counter() - started)
        self._breaker.record_success()
