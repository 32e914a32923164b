"""Build the clients of Redis and PostgreSQL and their breakers, from settings.

One breaker per dependency, shared by everything that calls it; transitions
become metrics and one log line each (the breaker logs). Start-up probes each
dependency once so a missing one is reported loudly, then the service serves
degraded rather than refusing to start. What they log passes through
``falcon_svc.redact``: the URLs, and the client libraries' errors, may hold a password.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from falcon_svc import metrics
from falcon_svc.cache import ResponseCache
from falcon_svc.idempotency import IdempotencyStore
from falcon_svc.redact import redact
from falcon_svc.redis_tls import PinnedCATLSConnection
from falcon_svc.requestlog import PostgresWriter, RequestLog, Spool, WriteAheadLog
from falcon_svc.resilience import CircuitBreaker, RecoveryProbe, RetryPolicy, State, guarded_call
from falcon_svc.settings import Settings

logger = logging.getLogger(__name__)

# How often an unhealthy Redis breaker is offered a PING off the request path; the
# breaker itself keeps trials to one per CIRCUIT_BREAKER_TIMEOUT_SECONDS while open.
REDIS_PROBE_INTERVAL_SECONDS = 1.0


def _report_transition(name: str, old: State, new: State) -> None:
    metrics.CIRCUIT_STATE.labels(name).set(new.gauge_value)
    metrics.CIRCUIT_TRANSITIONS.labels(name, new.value).inc()


def make_breaker(name: str, settings: Settings, *, on_failure: Callable[[], None] | None = None) -> CircuitBreaker:
    """Return the breaker for one dependency, reporting to metrics; ``on_failure`` runs on each failed call."""
    metrics.CIRCUIT_STATE.labels(name).set(0)
    metrics.DEPENDENCY_UP.labels(name).set(1)

    def report_outcome(dependency: str, ok: bool) -> None:
        metrics.DEPENDENCY_UP.labels(dependency).set(1 if ok else 0)
        if not ok and on_failure is not None:
            on_failure()

    return CircuitBreaker(
        name,
        failure_threshold=settings.circuit_breaker_failure_threshold,
        reset_timeout=settings.circuit_breaker_timeout_seconds,
        on_transition=_report_transition,
        on_outcome=report_outcome,
    )


def make_redis_client(settings: Settings) -> redis.Redis:
    """Return a Redis client that fails fast: short timeouts and no hidden retries.

    NOTE: redis-py retries 3 times with backoff by default; on the request path
    a failed read is a miss, never a wait, so its retries are switched off.
    """
    timeout = settings.redis_timeout_ms / 1000.0
    # rediss://: trust only the URL's ssl_ca_certs, with one context (redis_tls.py says why).
    tls = {"connection_class": PinnedCATLSConnection} if settings.redis_url.startswith("rediss:") else {}
    return redis.Redis.from_url(
        settings.redis_url,
        **tls,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        client_name="falcon-svc",
    )


@dataclass
class Dependencies:
    """What the app uses besides the model: cache, idempotency and their breakers."""

    cache: ResponseCache | None = None
    idempotency: IdempotencyStore | None = None
    request_log: RequestLog | None = None
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    probes: list[RecoveryProbe] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        """Return each dependency's health and breaker state for the readiness detail."""
        return {
            name: {"healthy": breaker.healthy, "circuit": breaker.state.value}
            for name, breaker in self.breakers.items()
        }

    def close(self, timeout: float) -> None:
        """Stop the recovery probes; flush what must not be lost (the request log) within ``timeout`` seconds."""
        for probe in self.probes:
            probe.stop()
        if self.request_log is not None:
            self.request_log.close(timeout)


def _probe_at_start(
    deps: Dependencies,
    breaker: CircuitBreaker,
    check: Callable[[], object],
    *,
    errors: tuple[type[BaseException], ...],
) -> BaseException | None:
    """Call a dependency once at start, through its breaker; if it fails, mark it degraded and return the error.

    The caller logs the error: what "degraded" means differs per dependency.
    """
    attempt = guarded_call(breaker, check, errors=errors, ask_breaker=False)
    if attempt.error is not None:
        deps.degraded[breaker.name] = f"unreachable at start ({type(attempt.error).__name__})"
    return attempt.error


def _connect_once(dsn: str) -> None:
    """Open and close one connection: does PostgreSQL answer at all?"""
    with psycopg.connect(dsn, connect_timeout=2):
        pass


def build_redis_dependencies(settings: Settings, model_version: str, deps: Dependencies) -> None:
    """Attach the cache and the idempotency store to ``deps``, probing Redis once.

    From Redis's first failure on, a ``RecoveryProbe`` PINGs it while the breaker
    is unhealthy, so the worker notices Redis is back even when no request uses it.
    """
    client = make_redis_client(settings)
    probe = RecoveryProbe(client.ping, interval=REDIS_PROBE_INTERVAL_SECONDS)
    breaker = make_breaker("redis", settings, on_failure=probe.start)
    probe.watch(breaker)
    deps.breakers["redis"] = breaker
    deps.probes.append(probe)
    ex = _probe_at_start(deps, breaker, client.ping, errors=(redis.RedisError,))
    if ex is not None:
        logger.warning(
            "DEGRADED: Redis unreachable at %s (%s); serving without the shared cache and without "
            "idempotency until it answers",
            redact(settings.redis_url),
            redact(ex),
        )
    if settings.cache_enabled:
        deps.cache = ResponseCache(
            client,
            breaker,
            model_version=model_version,
            ttl_seconds=settings.cache_ttl_seconds,
            local_items=settings.cache_local_items,
            redis_min_chars=settings.cache_redis_min_chars,
        )
    deps.idempotency = IdempotencyStore(
        client,
        breaker,
        ttl_seconds=settings.idempotency_ttl_seconds,
        lock_seconds=settings.idempotency_lock_seconds,
    )


def build_request_log(settings: Settings, deps: Dependencies) -> RequestLog:
    """Attach the PostgreSQL request log (write-ahead log, queue, writer thread, spool) to ``deps`` and return it.

    The writer is started by the caller, after gunicorn's fork.
    """
    breaker = make_breaker("postgres", settings)
    deps.breakers["postgres"] = breaker
    ex = _probe_at_start(deps, breaker, lambda: _connect_once(settings.database_url), errors=(psycopg.Error,))
    if ex is not None:
        logger.warning(
            "DEGRADED: PostgreSQL unreachable (%s); request-log rows are queued, then spooled to %s, "
            "and written when it answers",
            redact(str(ex).splitlines()[0]),
            settings.log_spool_dir,
        )
    spool = Spool(
        settings.log_spool_dir,
        settings.log_spool_max_bytes,
        rejected_retention=settings.log_rejected_retention_days * 86_400.0,
    )
    flush_interval = settings.log_flush_interval_ms / 1000.0
    request_log = RequestLog(
        PostgresWriter(settings.database_url),
        spool,
        breaker,
        RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            base_delay=settings.retry_base_delay_ms / 1000.0,
            max_delay=settings.retry_max_delay_ms / 1000.0,
        ),
        buffer_max=settings.log_buffer_max,
        batch_size=settings.log_batch_size,
        flush_interval=flush_interval,
        log_text=settings.log_request_text,
        wal=WriteAheadLog(spool, fsync=settings.log_fsync, sync_interval=flush_interval),
    )
    deps.request_log = request_log
    return request_log
