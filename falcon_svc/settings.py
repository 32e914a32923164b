"""Read the environment into typed, validated settings.

Every key is listed and explained in ``.env.example``. A bad value stops start-up
with one clear message (``SettingsError``) naming the key, the value and what is
allowed, so an operator reading ``journalctl`` knows what to fix.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

WORKER_CLASSES = {
    "sync": "falcon_svc.gunicorn_workers.SyncWorker",
    "gthread": "falcon_svc.gunicorn_workers.ThreadWorker",
    "meinheld": "falcon_svc.workers.MeinheldWorker",
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A configuration value is missing or invalid."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Typed configuration of one falcon-svc process (see ``.env.example``)."""

    # Serving (read by gunicorn_conf)
    bind: str = "127.0.0.1:8000"
    workers: int = 2
    worker_class: str = "meinheld"
    threads: int = 4
    timeout_seconds: int = 30
    graceful_shutdown_timeout_seconds: int = 20
    keepalive_seconds: int = 5
    max_requests: int = 0
    # Model
    model_dir: Path = Path("models/sentiment")
    fast_path: bool = True
    allow_dummy_model: bool = True
    # HTTP contract limits
    max_body_bytes: int = 2 * 1024 * 1024
    max_text_chars: int = 5000
    max_batch_size: int = 50
    # Redis: response cache and idempotency
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_ms: int = 50
    cache_enabled: bool = True
    cache_ttl_seconds: int = 3600
    cache_local_items: int = 10_000
    cache_redis_min_chars: int = 256
    idempotency_ttl_seconds: int = 86_400
    idempotency_lock_seconds: int = 30
    # PostgreSQL: the request log
    request_log_enabled: bool = True
    database_url: str = "postgresql://falcon@127.0.0.1:5432/falcon"
    log_buffer_max: int = 1000
    log_batch_size: int = 200
    log_flush_interval_ms: int = 200
    log_spool_dir: Path = Path("var/spool")
    log_spool_max_bytes: int = 256 * 2**20
    log_request_text: bool = False
    # Resilience
    circuit_breaker_failure_threshold: int = 5
    circuit_breaker_timeout_seconds: int = 60
    retry_max_attempts: int = 3
    retry_base_delay_ms: int = 100
    retry_max_delay_ms: int = 5000
    # Identity and logs
    instance_name: str = dataclasses.field(default_factory=socket.gethostname)
    log_level: str = "info"
    access_log: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``os.environ``).

        Raises:
            SettingsError: one message naming the first bad key.
        """
        env = os.environ if environ is None else environ
        defaults = cls()
        reader = _Reader(env)
        settings = cls(
            bind=reader.text("BIND", defaults.bind),
            workers=reader.integer("WORKERS", defaults.workers, minimum=1, maximum=64),
            worker_class=reader.choice("WORKER_CLASS", defaults.worker_class, tuple(WORKER_CLASSES)),
            threads=reader.integer("THREADS", defaults.threads, minimum=1, maximum=256),
            timeout_seconds=reader.integer("TIMEOUT_SECONDS", defaults.timeout_seconds, minimum=1, maximum=3600),
            graceful_shutdown_timeout_seconds=reader.integer(
                "GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS",
                defaults.graceful_shutdown_timeout_seconds,
                minimum=1,
                maximum=3600,
            ),
            keepalive_seconds=reader.integer("KEEPALIVE_SECONDS", defaults.keepalive_seconds, minimum=0, maximum=300),
            max_requests=reader.integer("MAX_REQUESTS", defaults.max_requests, minimum=0, maximum=10**9),
            model_dir=Path(reader.text("MODEL_DIR", str(defaults.model_dir))),
            fast_path=reader.boolean("FAST_PATH", defaults.fast_path),
            allow_dummy_model=reader.boolean("ALLOW_DUMMY_MODEL", defaults.allow_dummy_model),
            max_body_bytes=reader.integer("MAX_BODY_BYTES", defaults.max_body_bytes, minimum=1024, maximum=64 * 2**20),
            max_text_chars=reader.integer("MAX_TEXT_CHARS", defaults.max_text_chars, minimum=1, maximum=100_000),
            max_batch_size=reader.integer("MAX_BATCH_SIZE", defaults.max_batch_size, minimum=1, maximum=1000),
            redis_url=reader.text("REDIS_URL", defaults.redis_url),
            redis_timeout_ms=reader.integer("REDIS_TIMEOUT_MS", defaults.redis_timeout_ms, minimum=1, maximum=10_000),
            cache_enabled=reader.boolean("CACHE_ENABLED", defaults.cache_enabled),
            cache_ttl_seconds=reader.integer(
                "CACHE_TTL_SECONDS", defaults.cache_ttl_seconds, minimum=1, maximum=30 * 86400
            ),
            cache_local_items=reader.integer("CACHE_LOCAL_ITEMS", defaults.cache_local_items, minimum=0, maximum=10**7),
            cache_redis_min_chars=reader.integer(
                "CACHE_REDIS_MIN_CHARS", defaults.cache_redis_min_chars, minimum=0, maximum=10**7
            ),
            idempotency_ttl_seconds=reader.integer(
                "IDEMPOTENCY_TTL_SECONDS", defaults.idempotency_ttl_seconds, minimum=1, maximum=30 * 86400
            ),
            idempotency_lock_seconds=reader.integer(
                "IDEMPOTENCY_LOCK_SECONDS", defaults.idempotency_lock_seconds, minimum=1, maximum=3600
            ),
            request_log_enabled=reader.boolean("REQUEST_LOG_ENABLED", defaults.request_log_enabled),
            database_url=reader.text("DATABASE_URL", defaults.database_url),
            log_buffer_max=reader.integer("LOG_BUFFER_MAX", defaults.log_buffer_max, minimum=1, maximum=10**7),
            log_batch_size=reader.integer("LOG_BATCH_SIZE", defaults.log_batch_size, minimum=1, maximum=100_000),
            log_flush_interval_ms=reader.integer(
                "LOG_FLUSH_INTERVAL_MS", defaults.log_flush_interval_ms, minimum=1, maximum=60_000
            ),
            log_spool_dir=Path(reader.text("LOG_SPOOL_DIR", str(defaults.log_spool_dir))),
            log_spool_max_bytes=reader.integer(
                "LOG_SPOOL_MAX_BYTES", defaults.log_spool_max_bytes, minimum=0, maximum=2**40
            ),
            log_request_text=reader.boolean("LOG_REQUEST_TEXT", defaults.log_request_text),
            circuit_breaker_failure_threshold=reader.integer(
                "CIRCUIT_BREAKER_FAILURE_THRESHOLD", defaults.circuit_breaker_failure_threshold, minimum=1, maximum=1000
            ),
            circuit_breaker_timeout_seconds=reader.integer(
                "CIRCUIT_BREAKER_TIMEOUT_SECONDS", defaults.circuit_breaker_timeout_seconds, minimum=1, maximum=3600
            ),
            retry_max_attempts=reader.integer("RETRY_MAX_ATTEMPTS", defaults.retry_max_attempts, minimum=1, maximum=20),
            retry_base_delay_ms=reader.integer(
                "RETRY_BASE_DELAY_MS", defaults.retry_base_delay_ms, minimum=1, maximum=60_000
            ),
            retry_max_delay_ms=reader.integer(
                "RETRY_MAX_DELAY_MS", defaults.retry_max_delay_ms, minimum=1, maximum=600_000
            ),
            instance_name=reader.text("INSTANCE_NAME", defaults.instance_name),
            log_level=reader.choice("LOG_LEVEL", defaults.log_level, LOG_LEVELS),
            access_log=reader.boolean("ACCESS_LOG", defaults.access_log),
        )
        _check_bind(settings.bind)
        _check_url("REDIS_URL", settings.redis_url, ("redis", "rediss", "unix"))
        _check_url("DATABASE_URL", settings.database_url, ("postgresql", "postgres"))
        return settings

    @property
    def gunicorn_worker_class(self) -> str:
        """Return the dotted worker class gunicorn should load."""
        return WORKER_CLASSES[self.worker_class]


class _Reader:
    """Parse one key at a time, naming the key in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _get(self, key: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(key)
        if raw is None or raw.strip() == "":
            return default
        return parse(raw.strip())

    def text(self, key: str, default: str) -> str:
        return self._get(key, default, str)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        def parse(raw: str) -> int:
            try:
                value = int(raw)
            except ValueError as ex:
                raise SettingsError(f"{key}={raw!r} is not an integer") from ex
            if not minimum <= value <= maximum:
                raise SettingsError(f"{key}={value} is out of range [{minimum}, {maximum}]")
            return value

        return self._get(key, default, parse)

    def boolean(self, key: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise SettingsError(f"{key}={raw!r} is not a boolean (use true or false)")

        return self._get(key, default, parse)

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        def parse(raw: str) -> str:
            if raw.lower() not in allowed:
                raise SettingsError(f"{key}={raw!r} is not one of {', '.join(allowed)}")
            return raw.lower()

        return self._get(key, default, parse)


def _check_bind(bind: str) -> None:
    """Accept ``host:port`` or ``unix:/path``, the two forms gunicorn and nginx share."""
    if bind.startswith("unix:"):
        return
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"BIND={bind!r} must be HOST:PORT or unix:PATH")


def _check_url(key: str, url: str, schemes: tuple[str, ...]) -> None:
    """Refuse a URL whose scheme the client library would reject later, in every worker."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in schemes or not rest:
        raise SettingsError(f"{key}={url!r} must start with one of {', '.join(s + '://' for s in schemes)}")


def describe(settings: Settings) -> dict[str, Any]:
    """Return the settings as a JSON-friendly dict for the start-up log line."""
    return {field.name: str(getattr(settings, field.name)) for field in dataclasses.fields(settings)}
