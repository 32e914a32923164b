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
from typing import cast

import redis

from falcon_svc import metrics
from falcon_svc.model import Prediction
from falcon_svc.resilience import Attempt, CircuitBreaker, guarded_call

logger = logging.getLogger(__name__)

_WRITE_QUEUE_MAX = 10_000
_WRITE_BATCH_MAX = 200
_WRITE_INTERVAL = 0.05
# Anything else a Redis call raises is a bug, and propagates.
_REDIS_ERRORS = (redis.RedisError,)


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
        # NOTE: children bound once: .labels() takes a lock and a dict lookup per
        # call, and a Redis hit is budgeted in microseconds.
        self._mget_latency = metrics.DEPENDENCY_LATENCY.labels("redis", "mget")
        self._set_latency = metrics.DEPENDENCY_LATENCY.labels("redis", "set")

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
            raw = self._redis_mget(self._client, [keys[index] for index in missing])
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
        self._ensure_writer(self._client)

    def _redis_mget(self, client: redis.Redis, keys: list[str]) -> list[bytes | None]:
        # NOTE: execute_command skips mget()'s argument juggling: ~10 us a call
        # (and, unlike mget(), redis-py leaves it unannotated).
        attempt = guarded_call(
            self._breaker,
            lambda: client.execute_command("MGET", *keys),  # type: ignore[no-untyped-call]
            errors=_REDIS_ERRORS,
            latency=self._mget_latency,
        )
        if attempt.ok:
            return cast("list[bytes | None]", attempt.value)
        _count_failed(attempt, operations=1)  # a failed read counts once, whatever the number of keys
        return [None] * len(keys)

    def _ensure_writer(self, client: redis.Redis) -> None:
        # NOTE: started lazily, in the worker, after gunicorn's fork.
        if self._writer is not None and self._writer.is_alive():
            return
        with self._pending_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._write_loop, args=(client,), name="cache-writer", daemon=True
                )
                self._writer.start()

    def _write_loop(self, client: redis.Redis) -> None:
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
                self._write_batch(client, batch[start : start + _WRITE_BATCH_MAX])

    def _write_batch(self, client: redis.Redis, batch: list[tuple[str, bytes]]) -> None:
        def send() -> None:
            pipe = client.pipeline(transaction=False)
            for key, value in batch:
                pipe.set(key, value, ex=self._ttl)
            pipe.execute()

        # Dropping cache writes (breaker open, Redis failing) is safe: they are an optimisation.
        attempt = guarded_call(self._breaker, send, errors=_REDIS_ERRORS, latency=self._set_latency)
        if not attempt.ok:
            _count_failed(attempt, operations=len(batch))  # every write in the batch is lost


def _count_failed(attempt: Attempt[object], *, operations: int) -> None:
    """Count cache operations lost to a refused or failed Redis call: as ``circuit_open`` or by the error's class."""
    reason = "circuit_open" if attempt.refused else type(attempt.error).__name__
    metrics.CACHE_ERRORS.labels(reason).inc(operations)
