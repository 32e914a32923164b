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
import queue
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
    ) -> None:
        self._client = client
        self._breaker = breaker
        self._version = model_version
        self._ttl = ttl_seconds
        self._prefix = prefix
        self._local = LocalLRU(local_items, ttl_seconds)
        self._writes: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=_WRITE_QUEUE_MAX)
        self._writer: threading.Thread | None = None

    def get_many(self, digests: Sequence[str]) -> list[Prediction | None]:
        """Return the cached prediction per text digest, or None; one Redis round trip at most."""
        keys = [cache_key(self._prefix, self._version, digest) for digest in digests]
        found: list[Prediction | None] = [self._local.get(key) for key in keys]
        missing = [index for index, value in enumerate(found) if value is None]
        if missing and self._client is not None:
            raw = self._redis_mget([keys[index] for index in missing])
            for index, value in zip(missing, raw, strict=True):
                if value is not None:
                    prediction = decode(value)
                    found[index] = prediction
                    self._local.put(keys[index], prediction)
        hits = len(keys) - sum(1 for value in found if value is None)
        if hits:
            metrics.CACHE_HITS.inc(hits)
        if hits < len(keys):
            metrics.CACHE_MISSES.inc(len(keys) - hits)
        return found

    def put_many(self, digests: Sequence[str], predictions: Sequence[Prediction]) -> None:
        """Store fresh predictions: locally now, in Redis from the background writer."""
        keys = [cache_key(self._prefix, self._version, digest) for digest in digests]
        for key, prediction in zip(keys, predictions, strict=True):
            self._local.put(key, prediction)
            if self._client is None:
                continue
            try:
                self._writes.put_nowait((key, encode(prediction)))
            except queue.Full:
                metrics.CACHE_ERRORS.labels("write_queue_full").inc()
        if self._client is not None:
            self._ensure_writer()

    def _redis_mget(self, keys: list[str]) -> list[bytes | None]:
        if not self._breaker.allow():
            metrics.CACHE_ERRORS.labels("circuit_open").inc()
            return [None] * len(keys)
        started = time.perf_counter()
        try:
            values = self._client.mget(keys)
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
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="cache-writer", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        """Pipeline queued SETs to Redis, a batch at a time, while the breaker allows."""
        while True:
            batch = [self._writes.get()]
            while len(batch) < _WRITE_BATCH_MAX:
                try:
                    batch.append(self._writes.get_nowait())
                except queue.Empty:
                    break
            if not self._breaker.allow():
                # Dropping cache writes is safe: they are an optimisation.
                metrics.CACHE_ERRORS.labels("circuit_open").inc(len(batch))
                continue
            started = time.perf_counter()
            try:
                pipe = self._client.pipeline(transaction=False)
                for key, value in batch:
                    pipe.set(key, value, ex=self._ttl)
                pipe.execute()
            except redis.RedisError as ex:
                self._breaker.record_failure()
                metrics.CACHE_ERRORS.labels(type(ex).__name__).inc(len(batch))
                continue
            finally:
                metrics.DEPENDENCY_LATENCY.labels("redis", "set").observe(time.perf_counter() - started)
            self._breaker.record_success()
