"""Journal entries: the native protocol's encoding, priorities, fields, and the stdout fallback.

A real AF_UNIX datagram socket stands in for journald's; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import falcon
import falcon.testing
import pytest

from falcon_svc import logs
from falcon_svc.app import create_app
from falcon_svc.journal import (
    JOURNAL_SOCKET_OVERRIDE_ENV,
    JournalSender,
    decode_entry,
    journal_field,
    priority_for,
    sender_for,
    stream_is_journal,
)
from falcon_svc.logs import ACCESS_LOGGER, AccessLog, JSONFormatter, LineHandler, LogThrottle
from falcon_svc.model import Model
from falcon_svc.settings import Settings


@dataclasses.dataclass
class FakeJournald:
    """The receiving end of journald's socket: a real datagram socket bound in a temp dir."""

    sock: socket.socket
    path: str

    def entries(self) -> list[dict[str, str]]:
        """Return every entry queued so far, decoded."""
        received = []
        while True:
            try:
                received.append(decode_entry(self.sock.recv(1 << 20)))
            except BlockingIOError:
                return received


@pytest.fixture
def journald() -> Iterator[FakeJournald]:
    # NOTE: a short directory of its own: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="jd") as directory:
        path = os.path.join(directory, "socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            yield FakeJournald(sock, path)


@pytest.fixture(autouse=True)
def fresh_refusal_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the first refusal notice: the throttle is per process otherwise."""
    monkeypatch.setattr(logs, "_JOURNAL_REFUSALS", LogThrottle(60.0))


def record(message: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("falcon_svc.test", level, "/src/falcon_svc/x.py", 42, message, None, None, func="f")
    entry.__dict__.update(extra)
    return entry


# --- the encoding --------------------------------------------------------------------------------


def test_a_one_line_value_is_name_equals_value():
    assert journal_field(b"ROUTE", "/infer") == b"ROUTE=/infer\n"


@pytest.mark.parametrize("value", ["Traceback:\n  line 1\nValueError: x", "nul\0inside", "é\n"])
def test_a_value_with_a_newline_or_nul_uses_the_length_prefixed_form(value: str):
    data = value.encode()
    encoded = journal_field(b"TRACEBACK", value)
    assert encoded == b"TRACEBACK\n" + len(data).to_bytes(8, "little") + data + b"\n", encoded
    assert decode_entry(encoded + journal_field(b"NEXT", "x")) == {"TRACEBACK": value, "NEXT": "x"}


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (25, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (5, 7),
    ],
)
def test_logging_levels_map_to_syslog_priorities(level: int, priority: int):
    assert priority_for(level) == priority


# --- when the journal is used --------------------------------------------------------------------


def test_journal_stream_must_name_this_very_stream(tmp_path: Path):
    with (tmp_path / "out").open("w") as stream, (tmp_path / "other").open("w") as other:
        status = os.fstat(stream.fileno())
        mine = f"{status.st_dev}:{status.st_ino}"
        assert stream_is_journal(stream, mine)
        assert not stream_is_journal(other, mine), "a redirected stdout is not the journal"
        assert not stream_is_journal(stream, None) and not stream_is_journal(stream, "")
        assert not stream_is_journal(stream, "garbage") and not stream_is_journal(stream, "1:2:3")
        assert not stream_is_journal(io.StringIO(), mine), "a stream with no descriptor is never the journal"
        environ = {"JOURNAL_STREAM": mine, JOURNAL_SOCKET_OVERRIDE_ENV: str(tmp_path / "socket")}
        sender = sender_for(stream, environ)
        assert sender is not None and sender.path == str(tmp_path / "socket")
        assert sender_for(stream, environ) is sender, "one socket per process, however often logging is set up"
        assert sender_for(other, environ) is None


def test_outside_systemd_the_line_is_plain_json_on_the_stream():
    stream = io.StringIO()
    LineHandler(stream).handle(record("plain", request_id="r-1"))
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["msg"] == "plain" and json.loads(line)["request_id"] == "r-1"


# --- events --------------------------------------------------------------------------------------


def test_an_event_carries_its_priority_identifier_logger_and_request_id(journald: FakeJournald):
    stream = io.StringIO()
    handler = LineHandler(stream, journal=JournalSender(journald.path))
    handler.setFormatter(JSONFormatter())
    event = record("circuit %s open", request_id="r-7")
    event.args = ("redis",)
    handler.handle(event)
    (entry,) = journald.entries()
    assert stream.getvalue() == "", "an entry journald took is not written twice"
    assert json.loads(entry["MESSAGE"]) == json.loads(JSONFormatter().format(event)), "MESSAGE is today's line"
    assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "falcon-svc"
    assert entry["LOGGER"] == "falcon_svc.test" and entry["REQUEST_ID"] == "r-7"
    assert (entry["CODE_FILE"], entry["CODE_LINE"], entry["CODE_FUNC"]) == ("/src/falcon_svc/x.py", "42", "f")
    assert "TRACEBACK" not in entry and "EXCEPTION_TYPE" not in entry


def test_an_error_carries_its_exception_type_and_the_redacted_traceback(journald: FakeJournald):
    handler = LineHandler(io.StringIO(), journal=JournalSender(journald.path))
    try:
        raise ConnectionError("cannot reach postgresql://falcon:s3cret@db/falcon")
    except ConnectionError:
        event = record("failed", logging.ERROR)
        event.exc_info = sys.exc_info()
    handler.handle(event)
    (entry,) = journald.entries()
    assert entry["PRIORITY"] == "3"
    assert entry["EXCEPTION_TYPE"] == "ConnectionError"
    traceback = entry["TRACEBACK"]
    assert traceback.startswith("Traceback (most recent call last):\n") and "\n" in traceback.strip()
    assert "s3cret" not in traceback and "postgresql://falcon:***@db/falcon" in traceback
    assert "REQUEST_ID" not in entry, "no request, no REQUEST_ID field"


# --- access lines --------------------------------------------------------------------------------


@pytest.fixture
def access_enabled() -> Iterator[None]:
    logger = logging.getLogger(ACCESS_LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(before)


ACCESS_FIELDS = {"request_id": "r-9", "method": "POST", "route": "/infer", "path": "/infer", "worker": "h-8001:1"}


def test_an_access_entry_carries_the_fields_journalctl_filters_on(journald: FakeJournald, access_enabled: None):
    access = AccessLog(io.StringIO(), journal=JournalSender(journald.path))
    access.write({**ACCESS_FIELDS, "status": 422, "code": "invalid_input", "field": "text"})
    access.write({**ACCESS_FIELDS, "status": 200, "model_version": "v3"})
    refused, served = journald.entries()
    assert (
        json.loads(refused["MESSAGE"])["code"] == "invalid_input" and json.loads(refused["MESSAGE"])["field"] == "text"
    )
    assert refused["SYSLOG_IDENTIFIER"] == "falcon-access" and refused["PRIORITY"] == "6"
    expected = {"REQUEST_ID": "r-9", "ROUTE": "/infer", "STATUS": "422", "ERROR_CODE": "invalid_input"}
    assert expected | {"WORKER": "h-8001:1"} == {key: refused[key] for key in [*expected, "WORKER"]}
    assert "MODEL_VERSION" not in refused
    assert served["STATUS"] == "200" and served["MODEL_VERSION"] == "v3" and "ERROR_CODE" not in served


def test_a_value_with_a_newline_still_makes_a_well_formed_access_entry(journald: FakeJournald, access_enabled: None):
    access = AccessLog(io.StringIO(), journal=JournalSender(journald.path))
    access.write({**ACCESS_FIELDS, "status": 200, "model_version": "v3\nPRIORITY=0", "code": "x\0y"})
    (entry,) = journald.entries()
    assert entry["MODEL_VERSION"] == "v3\nPRIORITY=0" and entry["PRIORITY"] == "6", "a value must not forge a field"
    assert entry["ERROR_CODE"] == "x\0y" and entry["REQUEST_ID"] == "r-9" and entry["STATUS"] == "200"
    assert json.loads(entry["MESSAGE"])["model_version"] == "v3\nPRIORITY=0"


# --- never lose a line, never raise, never block ------------------------------------------------


def test_a_restarted_journald_gets_the_next_entry(journald: FakeJournald):
    sender = JournalSender(journald.path)
    assert sender.send(b"MESSAGE=one\n")
    journald.sock.close()
    os.unlink(journald.path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as restarted:
        restarted.bind(journald.path)
        assert sender.send(b"MESSAGE=two\n"), sender.last_error
        assert decode_entry(restarted.recv(4096)) == {"MESSAGE": "two"}


def test_a_missing_socket_falls_back_to_the_stream_with_the_priority_prefix(tmp_path: Path, access_enabled: None):
    stream = io.StringIO()
    sender = JournalSender(str(tmp_path / "no-journald-here"))
    handler = LineHandler(stream, journal=sender)
    handler.handle(record("still said", logging.ERROR))
    AccessLog(stream, journal=sender).write({**ACCESS_FIELDS, "status": 200})
    notice, event, access = stream.getvalue().splitlines()
    assert notice.startswith("<4>") and "journald refused" in notice and sender.last_error in notice
    assert event.startswith("<3>") and json.loads(event[3:])["msg"] == "still said"
    assert access.startswith("<6>") and json.loads(access[3:])["request_id"] == "r-9"
    assert sender.last_error, "the reason is kept for the notice"


def test_a_full_journal_socket_never_blocks_and_the_lines_go_to_the_stream(
    journald: FakeJournald, access_enabled: None
):
    sender = JournalSender(journald.path)
    stream = io.StringIO()
    access = AccessLog(stream, journal=sender)
    written = 0
    # Nobody reads the socket: its queue fills, then sends fail with EAGAIN instead of waiting.
    while stream.getvalue() == "" and written < 100_000:
        access.write({**ACCESS_FIELDS, "status": 200, "request_id": f"r-{written}"})
        written += 1
    assert stream.getvalue(), "a journal socket nobody reads never refused an entry: the test proves nothing"
    queued = len(journald.entries())
    fallen_back = [line for line in stream.getvalue().splitlines() if line.startswith("<6>")]
    assert queued + len(fallen_back) == written, f"{written} lines: {queued} queued, {len(fallen_back)} on stdout"


def test_an_entry_too_large_for_a_datagram_is_written_whole_to_the_stream(journald: FakeJournald):
    stream = io.StringIO()
    handler = LineHandler(stream, journal=JournalSender(journald.path))
    handler.handle(record("x" * 8_000_000))
    assert journald.entries() == []
    (_, line) = stream.getvalue().splitlines()
    assert line.startswith("<4>") and json.loads(line[3:])["msg"] == "x" * 8_000_000


# --- the app: 4xx lines say why, 5xx tracebacks stay in the log -------------------------------------


@pytest.fixture
def logged_app(settings: Settings, model: Model, access_enabled: None) -> falcon.testing.TestClient:
    """The app with its access log on (the access logger's level is read when the app is built)."""
    return falcon.testing.TestClient(
        create_app(dataclasses.replace(settings, access_log="all"), model, worker_id="test:1")
    )


def access_lines(captured: str) -> list[dict[str, object]]:
    return [entry for entry in map(json.loads, captured.splitlines()) if entry.get("logger") == ACCESS_LOGGER]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "field"),
    [
        ({"text": ""}, {"Content-Type": "application/json"}, 422, "invalid_input", "text"),
        ({"text": "ok"}, {"Content-Type": "text/plain"}, 415, "unsupported_media_type", None),
    ],
)
def test_a_4xx_access_line_carries_the_code_and_field(logged_app, capsys, body, headers, status, code, field):
    result = logged_app.simulate_post("/infer", body=json.dumps(body), headers=headers)
    assert result.status_code == status, result.text
    (line,) = access_lines(capsys.readouterr().out)
    assert (line["status"], line["code"], line["field"]) == (status, code, field), line
    assert result.json["error"]["code"] == code


def test_a_served_line_names_the_model_version_and_no_error(logged_app, capsys, model: Model):
    assert logged_app.simulate_post("/infer", json={"text": "fine"}).status_code == 200
    (line,) = access_lines(capsys.readouterr().out)
    assert line["model_version"] == model.version and "code" not in line and "field" not in line


def test_errors_mode_logs_the_4xx_and_not_the_200(settings: Settings, model: Model, access_enabled: None, capsys):
    client = falcon.testing.TestClient(
        create_app(dataclasses.replace(settings, access_log="errors"), model, worker_id="test:1")
    )
    assert client.simulate_post("/infer", json={"text": "fine"}).status_code == 200
    assert client.simulate_post("/infer", json={"text": ""}).status_code == 422
    assert [line["status"] for line in access_lines(capsys.readouterr().out)] == [422]


def test_off_mode_logs_no_line(settings: Settings, model: Model, access_enabled: None, capsys):
    client = falcon.testing.TestClient(
        create_app(dataclasses.replace(settings, access_log="off"), model, worker_id="test:1")
    )
    assert client.simulate_post("/infer", json={"text": ""}).status_code == 422
    assert access_lines(capsys.readouterr().out) == []


class ExplodingModel:
    """The real model, except that predicting raises: a bug in the model path."""

    def __init__(self, model: Model) -> None:
        self._model = model

    def __getattr__(self, name: str) -> object:
        return getattr(self._model, name)

    def predict(self, texts: list[str]) -> list[object]:
        raise RuntimeError("boom at /srv/secret/path")


def test_a_500_logs_type_and_traceback_with_the_request_id_and_tells_the_client_neither(
    settings: Settings, model: Model, access_enabled: None, caplog: pytest.LogCaptureFixture
):
    app = create_app(settings, ExplodingModel(model), worker_id="test:1")  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="falcon_svc.errors"):
        result = falcon.testing.TestClient(app).simulate_post("/infer", json={"text": "good"})
    assert result.status_code == 500
    assert result.json["error"]["code"] == "internal_error"
    for secret in ("boom", "RuntimeError", "Traceback", "/srv/secret"):
        assert secret not in result.text, f"{secret!r} leaked into the response body: {result.text}"
    (error,) = [entry for entry in caplog.records if entry.name == "falcon_svc.errors"]
    assert error.levelno == logging.ERROR and error.exc_info and error.exc_info[0] is RuntimeError
    assert error.__dict__["request_id"] == result.headers["X-Request-ID"]
    assert error.__dict__["exception_type"] == "RuntimeError"
