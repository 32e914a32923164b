"""Log as one JSON object per line on stdout, which journald keeps as is.

``journalctl -u falcon-worker@8001 -o cat | jq`` then works without parsing.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from falcon_svc.redact import redact

ACCESS_LOGGER = "falcon_svc.access"

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """Format a record as a JSON line with ``extra=`` fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            # A safety net for lines we do not write (gunicorn, psycopg, redis-py):
            # our own messages are redacted where they are built. Off the request
            # path: the access log bypasses this formatter.
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class LogThrottle:
    """Let one log line through per ``interval`` seconds, and count the events held back in between.

    NOTE: a full disk or a dead database fails every call; one line per failure
    would bury the journal under load. Metrics still count every event: only the
    lines are thinned, and the next line says how many it stands for. Thread-safe.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._held = 0
        self._logged_at: float | None = None

    def admit(self, count: int = 1) -> int | None:
        """Record ``count`` events; return how many to report now (those held back included), or None to stay quiet."""
        with self._lock:
            self._held += count
            now = self._clock()
            if self._logged_at is not None and now - self._logged_at < self._interval:
                return None
            events, self._held, self._logged_at = self._held, 0, now
            return events


class AccessLog:
    """Write the one-per-request JSON line, bypassing ``logging``'s record machinery.

    NOTE: a LogRecord plus a Formatter cost ~50 us per request; building the
    line directly costs a few. The line has the same shape as JSONFormatter's
    and goes to the same stream, and the access logger's level still rules.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self.enabled = logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)

    def write(self, fields: dict[str, Any]) -> None:
        """Write one request's line (no-op when the access logger is above INFO)."""
        if not self.enabled:
            return
        entry = {"ts": _iso_time(time.time()), "level": "info", "logger": ACCESS_LOGGER, "msg": "request", **fields}
        (self._stream or sys.stdout).write(json.dumps(entry, default=str, ensure_ascii=False) + "\n")


def configure_logging(level: str = "info") -> None:
    """Send every logger to stdout as JSON lines, replacing earlier handlers.

    Idempotent, so gunicorn hooks and ``get_app`` can both call it.
    """
    # NOTE: line-buffered, so journald gets each line at once and a SIGKILL
    # loses none; Python block-buffers stdout when it is not a terminal.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # NOTE: psycopg's pool warns on every reconnect attempt; during an outage
    # that buries the journal, and the breaker already logs each transition once.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
