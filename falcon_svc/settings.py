"""Read the environment into typed, validated settings.

Every key is listed and explained in ``.env.example``. A bad value stops start-up
with one clear message (``SettingsError``) naming the key, the value and what is
allowed, so an operator reading ``journalctl`` knows what to fix.

A setting is one line of ``Settings``: the environment key is the field name in
upper case, the parser follows the annotation (``int``, ``bool``, ``str``, ``Path``),
and ``_setting()`` records what is allowed (bounds, choices, a check of the value).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from falcon_svc.access import parse_networks
from falcon_svc.redact import redact

T = TypeVar("T")

WORKER_CLASSES = {
    "sync": "falcon_svc.gunicorn_workers.SyncWorker",
    "gthread": "falcon_svc.gunicorn_workers.ThreadWorker",
    "meinheld": "falcon_svc.workers.MeinheldWorker",
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Which requests get the worker's JSON access line (falcon_svc/middleware/context.py):
# every one, only answers >= 400, or none (nginx's JSON access log has every request).
ACCESS_LOG_MODES = ("all", "errors", "off")
# What a power cut can lose of the request log's write-ahead file (falcon_svc/requestlog/wal.py).
LOG_FSYNC_MODES = ("off", "interval", "always")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A configuration value is missing or invalid; its message never shows a password."""

    def __init__(self, message: str) -> None:
        # NOTE: messages quote the bad value, and a URL's value may carry a password.
        super().__init__(redact(message))


def _check_bind(key: str, bind: str) -> None:
    """Accept ``host:port`` or ``unix:/path``, the two forms gunicorn and nginx share."""
    if bind.startswith("unix:"):
        return
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{key}={bind!r} must be HOST:PORT or unix:PATH")


def _check_url(key: str, url: str, schemes: tuple[str, ...]) -> None:
    """Refuse a URL whose scheme the client library would reject later, in every worker."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in schemes or not rest:
        raise SettingsError(f"{key}={url!r} must start with one of {', '.join(s + '://' for s in schemes)}")


def _check_networks(key: str, spec: str) -> None:
    """Accept comma-separated CIDR networks, each with no host bits set (``10.0.0.0/8``)."""
    try:
        parse_networks(spec)
    except ValueError as ex:
        raise SettingsError(f"{key}={spec!r} must be comma-separated networks like 10.0.0.0/8 ({ex})") from ex


def _check_database_url(key: str, url: str) -> None:
    """Refuse a PostgreSQL URL that libpq cannot parse, without quoting libpq.

    NOTE: libpq's parse errors quote the offending token, and for a badly
    percent-encoded password that token is the password itself
    ("invalid percent-encoded token: ..."), which no redaction can spot. Parsed
    here, the service never logs such an error later, in every worker.
    """
    _check_url(key, url, ("postgresql", "postgres"))
    import psycopg  # NOTE: here, not at the top: the gunicorn master has little use for it.
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # NOTE: "from None": a chained cause would print libpq's message in any traceback.
        raise SettingsError(
            f"{key}={url!r} is not a connection URI libpq can read "
            "(check the host, the port, the query and the %-encoding of the user and password)"
        ) from None


def _check_hmac_key(key: str, value: str) -> None:
    """Accept no key (no digest is logged) or one of 32+ characters; never quote it."""
    if value and len(value) < 32:
        raise SettingsError(f"{key} is {len(value)} characters long; use 32 or more (openssl rand -hex 32)")


def _url(*schemes: str) -> Callable[[str, str], None]:
    """Return the check of a URL setting whose client library speaks ``schemes``."""
    return partial(_check_url, schemes=schemes)


def _setting(
    default: T,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: Mapping[str, str] | None = None,
    check: Callable[[str, T], None] | None = None,
    secret: bool = False,
) -> T:
    """Declare a setting's default and what ``from_env`` accepts for it.

    ``minimum``/``maximum`` bound an ``int`` (both required); ``choices`` are the
    lower-case values a ``str`` may take, in any case, and ``aliases`` older spellings of
    them (a value once a boolean keeps working); ``check(key, value)`` runs on
    the final value, default included, once every key has parsed. A ``secret`` is
    never shown by ``describe``.
    """
    rules = {
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "aliases": aliases,
        "check": check,
        "secret": secret or None,
    }
    return dataclasses.field(default=default, metadata={name: rule for name, rule in rules.items() if rule is not None})


@dataclass(frozen=True, slots=True)
class Settings:
    """Typed configuration of one falcon-svc process (see ``.env.example``)."""

    # Serving (read by gunicorn_conf)
    bind: str = _setting("127.0.0.1:8000", check=_check_bind)
    workers: int = _setting(2, minimum=1, maximum=64)
    worker_class: str = _setting("meinheld", choices=tuple(WORKER_CLASSES))
    threads: int = _setting(4, minimum=1, maximum=256)
    timeout_seconds: int = _setting(30, minimum=1, maximum=3600)
    graceful_shutdown_timeout_seconds: int = _setting(20, minimum=1, maximum=3600)
    keepalive_seconds: int = _setting(5, minimum=0, maximum=300)
    max_requests: int = _setting(0, minimum=0, maximum=10**9)
    # Model
    model_dir: Path = Path("models/sentiment")
    fast_path: bool = True
    allow_dummy_model: bool = True
    # Comma-separated Ed25519 public key files; set: the model must be signed by one (model/signing.py)
    model_public_key: str = ""
    # The model store (falcon_svc/model/store.py): set, workers serve its active version, not MODEL_DIR
    model_store: str = ""
    # The activation gate (falcon_svc/training/gate.py): the largest drop in accuracy or macro-F1 on a
    # gate set, in points, and the behavioural suite's floor, in percent
    model_gate_tolerance_points: int = _setting(2, minimum=0, maximum=100)
    model_behaviour_floor_percent: int = _setting(70, minimum=0, maximum=100)
    # HTTP contract limits
    max_body_bytes: int = _setting(2 * 1024 * 1024, minimum=1024, maximum=64 * 2**20)
    max_text_chars: int = _setting(5000, minimum=1, maximum=100_000)
    max_batch_size: int = _setting(50, minimum=1, maximum=1000)
    # Redis: response cache and idempotency
    redis_url: str = _setting("redis://127.0.0.1:6379/0", check=_url("redis", "rediss", "unix"))
    redis_timeout_ms: int = _setting(50, minimum=1, maximum=10_000)
    cache_enabled: bool = True
    cache_ttl_seconds: int = _setting(3600, minimum=1, maximum=30 * 86400)
    cache_local_items: int = _setting(10_000, minimum=0, maximum=10**7)
    cache_redis_min_chars: int = _setting(256, minimum=0, maximum=10**7)
    idempotency_ttl_seconds: int = _setting(86_400, minimum=1, maximum=30 * 86400)
    idempotency_lock_seconds: int = _setting(30, minimum=1, maximum=3600)
    idempotency_max_response_bytes: int = _setting(262_144, minimum=1024, maximum=16 * 1024 * 1024)
    # PostgreSQL: the request log
    request_log_enabled: bool = True
    database_url: str = _setting("postgresql://falcon@127.0.0.1:5432/falcon", check=_check_database_url)
    log_buffer_max: int = _setting(1000, minimum=1, maximum=10**7)
    log_batch_size: int = _setting(200, minimum=1, maximum=100_000)
    log_flush_interval_ms: int = _setting(200, minimum=1, maximum=60_000)
    log_spool_dir: Path = Path("var/spool")
    log_spool_max_bytes: int = _setting(256 * 2**20, minimum=0, maximum=2**40)
    log_rejected_retention_days: int = _setting(7, minimum=1, maximum=366)
    log_fsync: str = _setting("off", choices=LOG_FSYNC_MODES)
    log_request_text: bool = False
    # Request-log retention and privacy (falcon_svc/requestlog/retention.py, rows.text_hmac)
    request_log_retention_days: int = _setting(30, minimum=1, maximum=3660)
    log_text_hmac_key: str = _setting("", check=_check_hmac_key, secret=True)
    # Resilience
    circuit_breaker_failure_threshold: int = _setting(5, minimum=1, maximum=1000)
    circuit_breaker_timeout_seconds: int = _setting(60, minimum=1, maximum=3600)
    retry_max_attempts: int = _setting(3, minimum=1, maximum=20)
    retry_base_delay_ms: int = _setting(100, minimum=1, maximum=60_000)
    retry_max_delay_ms: int = _setting(5000, minimum=1, maximum=600_000)
    # Identity and logs
    instance_name: str = dataclasses.field(default_factory=socket.gethostname)
    log_level: str = _setting("info", choices=LOG_LEVELS)
    access_log: str = _setting("all", choices=ACCESS_LOG_MODES, aliases={"true": "all", "false": "off"})
    # Internal endpoints: who sees /metrics and the detail of /readyz and /v1/models (falcon_svc/access.py)
    metrics_allowed_networks: str = _setting("127.0.0.0/8,::1/128", check=_check_networks)
    # API keys (falcon_svc/auth): the key file; empty: no authentication (``make run``)
    api_keys_file: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``os.environ``).

        A key that is unset or blank keeps its default.

        Raises:
            SettingsError: one message naming the first bad key.
        """
        env = os.environ if environ is None else environ
        types = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        values = {}
        for field in fields:
            raw = env.get(field.name.upper(), "").strip()
            if raw:
                values[field.name] = _PARSERS[types[field.name]](field.name.upper(), raw, field.metadata)
        settings = cls(**values)
        # NOTE: checks come after every key has parsed, as they always have, so the
        # first bad key reported is the same whichever keys are set.
        for field in fields:
            if check := field.metadata.get("check"):
                check(field.name.upper(), getattr(settings, field.name))
        return settings

    @property
    def bind_port(self) -> int | None:
        """Return the TCP port this process listens on (None for a unix socket)."""
        if self.bind.startswith("unix:"):
            return None
        return int(self.bind.rpartition(":")[2])

    @property
    def gunicorn_worker_class(self) -> str:
        """Return the dotted worker class gunicorn should load."""
        return WORKER_CLASSES[self.worker_class]


def _integer(key: str, raw: str, rules: Mapping[str, Any]) -> int:
    try:
        value = int(raw)
    except ValueError as ex:
        raise SettingsError(f"{key}={raw!r} is not an integer") from ex
    minimum, maximum = rules["minimum"], rules["maximum"]
    if not minimum <= value <= maximum:
        raise SettingsError(f"{key}={value} is out of range [{minimum}, {maximum}]")
    return value


def _boolean(key: str, raw: str, rules: Mapping[str, Any]) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{key}={raw!r} is not a boolean (use true or false)")


def _text(key: str, raw: str, rules: Mapping[str, Any]) -> str:
    allowed = rules.get("choices")
    if allowed is None:
        return raw
    lowered: str = raw.lower()
    lowered = rules.get("aliases", {}).get(lowered, lowered)
    if lowered not in allowed:
        raise SettingsError(f"{key}={raw!r} is not one of {', '.join(allowed)}")
    return lowered


def _path(key: str, raw: str, rules: Mapping[str, Any]) -> Path:
    return Path(raw)


# One parser per annotation: parse(key, stripped raw value, the field's rules).
_PARSERS: dict[Any, Callable[[str, str, Mapping[str, Any]], Any]] = {
    int: _integer,
    bool: _boolean,
    str: _text,
    Path: _path,
}


def describe(settings: Settings) -> dict[str, Any]:
    """Return the settings as a JSON-friendly dict for ``falcon-svc check``, passwords hidden."""
    return {
        field.name: ("<hidden>" if getattr(settings, field.name) else "")
        if field.metadata.get("secret")
        else redact(getattr(settings, field.name))
        for field in dataclasses.fields(settings)
    }
