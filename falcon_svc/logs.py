"""Log as one JSON object per line: on stdout, or under systemd as journal entries with fields.

``journalctl -u falcon-worker@8001 -o cat | jq`` works either way: the journal
entry's MESSAGE is the same JSON line. Under systemd (falcon_svc/journal.py) each
entry also carries its priority (``-p warning`` finds warnings), a
SYSLOG_IDENTIFIER (``-t falcon-svc``: events; ``-t falcon-access``: one line per
request) and fields to filter on (``REQUEST_ID=...``, ``STATUS=422``, ...).
An entry journald does not take is written to stdout (the journal stream) with
the ``<N>`` prefix journald reads as its priority: the line survives, its
fields do not, and a throttled warning says so.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Literal, TextIO

from falcon_svc.journal import JournalSender, journal_field, priority_for, sender_for
from falcon_svc.redact import redact

ACCESS_LOGGER = "falcon_svc.access"
EVENTS_IDENTIFIER = "falcon-svc"
ACCESS_IDENTIFIER = "falcon-access"
# Find the journal sender from the stream (the default), or use the one given (None: plain lines).
DETECT: Final = "detect"
Journal = JournalSender | None | Literal["detect"]

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
            # Cached on the record, as logging.Formatter does: the journal's TRACEBACK field reuses it.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            entry["exc"] = redact(record.exc_text)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _iso_time(created: float) -> str:
    return f"{_iso_seconds(int(created))}.{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_seconds(whole: int) -> str:
    """Format the seconds once per second, not per line: strftime is half the timestamp's cost on the request path."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


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


# A journal that refuses entries (journald behind, socket gone) is said once a minute, not per line.
_JOURNAL_REFUSALS = LogThrottle(60.0)


def _fallback_text(line: str, priority: int, sender: JournalSender) -> str:
    """Return the stdout text for an entry journald refused: the line with its ``<N>`` priority prefix.

    NOTE: written to the stream directly, not through ``logging``, which would
    send the warning to the same refusing socket.
    """
    text = f"<{priority}>{line}\n"
    refused = _JOURNAL_REFUSALS.admit()
    if refused is not None:
        notice = {
            "ts": _iso_time(time.time()),
            "level": "warning",
            "logger": "falcon_svc.journal",
            "msg": "journald refused entries: written to stdout without their fields",
            "refused": refused,
            "error": sender.last_error,
        }
        text = f"<4>{json.dumps(notice)}\n{text}"
    return text


class LineHandler(logging.StreamHandler[TextIO]):
    """Emit each record's JSON line to the stream, or under systemd as a journal entry with fields."""

    def __init__(self, stream: TextIO | None = None, journal: Journal = DETECT) -> None:
        super().__init__(sys.stdout if stream is None else stream)
        self.journal = sender_for(self.stream) if journal == DETECT else journal
        if self.formatter is None:
            self.setFormatter(JSONFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            sender = self.journal
            if sender is None:
                self.stream.write(line + "\n")
            else:
                priority = priority_for(record.levelno)
                if not sender.send(event_entry(record, line, priority)):
                    self.stream.write(_fallback_text(line, priority, sender))
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


_EVENT_PREFIX = journal_field(b"SYSLOG_IDENTIFIER", EVENTS_IDENTIFIER)


def event_entry(record: logging.LogRecord, line: str, priority: int) -> bytes:
    """Encode an event (any logger but the access log) as a journal entry; ``line`` is its JSON."""
    parts = [
        _EVENT_PREFIX,
        b"PRIORITY=%d\n" % priority,
        journal_field(b"MESSAGE", line),
        journal_field(b"LOGGER", record.name),
        journal_field(b"CODE_FILE", record.pathname),
        b"CODE_LINE=%d\n" % record.lineno,
        journal_field(b"CODE_FUNC", record.funcName or ""),
    ]
    request_id = record.__dict__.get("request_id")
    if request_id is not None:
        parts.append(journal_field(b"REQUEST_ID", str(request_id)))
    if record.exc_info and record.exc_info[0] is not None:
        kind = record.exc_info[0]
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        parts.append(journal_field(b"EXCEPTION_TYPE", name))
        if record.exc_text:
            # Multi-line: the length-prefixed form; `journalctl -o verbose` shows it as written.
            parts.append(journal_field(b"TRACEBACK", redact(record.exc_text)))
    return b"".join(parts)


_ACCESS_PREFIX = journal_field(b"SYSLOG_IDENTIFIER", ACCESS_IDENTIFIER) + b"PRIORITY=6\n"


class AccessLog:
    """Write the one-per-request JSON line, bypassing ``logging``'s record machinery.

    NOTE: a LogRecord plus a Formatter cost ~50 us per request; building the
    line directly costs a few. The line has the same shape as JSONFormatter's
    and goes to the same stream, and the access logger's level still rules.
    Under systemd the line is a journal entry's MESSAGE, built with one join,
    the worker's constant fields encoded once.
    """

    def __init__(self, stream: TextIO | None = None, journal: Journal = DETECT) -> None:
        self._stream = stream
        self.enabled = logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
        self.journal = sender_for(stream or sys.stdout) if journal == DETECT else journal
        # worker id -> its encoded constant fields (one entry per worker in practice).
        self._constant: dict[object, bytes] = {}

    def write(self, fields: dict[str, Any]) -> None:
        """Write one request's line (no-op when the access logger is above INFO)."""
        if not self.enabled:
            return
        entry = {"ts": _iso_time(time.time()), "level": "info", "logger": ACCESS_LOGGER, "msg": "request", **fields}
        line = json.dumps(entry, default=str, ensure_ascii=False)
        sender = self.journal
        if sender is None:
            (self._stream or sys.stdout).write(line + "\n")
        elif not sender.send(self._entry(line, fields)):
            (self._stream or sys.stdout).write(_fallback_text(line, 6, sender))

    def _entry(self, line: str, fields: dict[str, Any]) -> bytes:
        """Encode the journal entry: MESSAGE is the line; the fields journalctl filters on ride beside it.

        NOTE: the request path's cost: one f-string and one encode (~1 us), not a
        ``journal_field`` per field (~4 us). Every field then takes the
        ``NAME=value`` form, which holds only while no value has a newline or NUL
        (the JSON line never does: json.dumps escapes them); the count below
        checks it, and an entry that fails it is encoded field by field.
        """
        worker = fields.get("worker")
        constant = self._constant.get(worker)
        if constant is None:
            constant = self._constant[worker] = _ACCESS_PREFIX + journal_field(b"WORKER", str(worker))
        code = fields.get("code")
        model_version = fields.get("model_version")
        request_id, route, status = fields.get("request_id"), fields.get("route"), fields.get("status")
        text = f"MESSAGE={line}\nREQUEST_ID={request_id}\nROUTE={route}\nSTATUS={status}\n"
        if code is not None:
            text += f"ERROR_CODE={code}\n"
        if model_version is not None:
            text += f"MODEL_VERSION={model_version}\n"
        if text.count("\n") == 4 + (code is not None) + (model_version is not None) and "\0" not in text:
            return constant + text.encode("utf-8", "backslashreplace")
        named = {"REQUEST_ID": request_id, "ROUTE": route, "STATUS": status, "ERROR_CODE": code}
        named["MODEL_VERSION"] = model_version
        values = [journal_field(name.encode(), str(value)) for name, value in named.items() if value is not None]
        return b"".join([constant, journal_field(b"MESSAGE", line), *values])


def configure_logging(level: str = "info") -> None:
    """Send every logger to stdout as JSON lines (under systemd: journal entries), replacing earlier handlers.

    Idempotent, so gunicorn hooks and ``get_app`` can both call it.
    """
    # NOTE: line-buffered, so journald gets each line at once and a SIGKILL
    # loses none; Python block-buffers stdout when it is not a terminal.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = LineHandler(sys.stdout)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # NOTE: psycopg's pool warns on every reconnect attempt; during an outage
    # that buries the journal, and the breaker already logs each transition once.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
