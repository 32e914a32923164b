"""Log lines are one JSON object each, with extra= fields at the top level."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import pytest

from falcon_svc.logs import ACCESS_LOGGER, AccessLog, JSONFormatter, LogThrottle, _iso_time


def record(message: str, *args: object, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("falcon_svc.test", level, __file__, 1, message, args, None)
    entry.__dict__.update(extra)
    return entry


def test_a_record_is_one_json_line_with_its_extra_fields():
    entry = record("circuit %s: %s -> %s", "redis", "closed", "open", dependency="redis", to_state="open")
    entry.created = 1764590400.25
    line = JSONFormatter().format(entry)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed == {
        "ts": "2025-12-01T12:00:00.250Z",
        "level": "warning",
        "logger": "falcon_svc.test",
        "msg": "circuit redis: closed -> open",
        "dependency": "redis",
        "to_state": "open",
    }


def test_the_timestamp_follows_each_second_and_millisecond():
    # The seconds part is cached per second: a later second must not reuse an earlier one.
    assert _iso_time(1764590400.25) == "2025-12-01T12:00:00.250Z"
    assert _iso_time(1764590401.999) == "2025-12-01T12:00:01.999Z"
    assert _iso_time(1764590400.0) == "2025-12-01T12:00:00.000Z"
    assert _iso_time(1764676800.5) == "2025-12-02T12:00:00.500Z"


def test_an_exception_is_kept_in_the_line():
    try:
        raise ValueError("boom")
    except ValueError:
        entry = record("failed", level=logging.ERROR)
        entry.exc_info = sys.exc_info()
    parsed = json.loads(JSONFormatter().format(entry))
    assert parsed["level"] == "error"
    assert "ValueError: boom" in parsed["exc"] and "Traceback" in parsed["exc"]


def test_values_json_cannot_hold_are_written_as_text_and_unicode_stays_readable():
    parsed = json.loads(JSONFormatter().format(record("é", path=object(), note="naïve")))
    assert parsed["msg"] == "é" and parsed["note"] == "naïve"
    assert parsed["path"].startswith("<object object")


@pytest.fixture
def access_logger_level():
    logger = logging.getLogger(ACCESS_LOGGER)
    before = logger.level
    yield logger
    logger.setLevel(before)


def test_the_access_line_has_the_same_shape(access_logger_level):
    access_logger_level.setLevel(logging.INFO)
    stream = io.StringIO()
    AccessLog(stream).write({"request_id": "r-1", "status": 200, "latency_ms": 1.5})
    (line,) = stream.getvalue().splitlines()
    parsed = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["ts"]), parsed["ts"]
    assert parsed | {"ts": None} == {
        "ts": None,
        "level": "info",
        "logger": ACCESS_LOGGER,
        "msg": "request",
        "request_id": "r-1",
        "status": 200,
        "latency_ms": 1.5,
    }


def test_the_access_line_follows_its_logger_level(access_logger_level):
    access_logger_level.setLevel(logging.WARNING)
    stream = io.StringIO()
    AccessLog(stream).write({"request_id": "r-1"})
    assert stream.getvalue() == ""


def test_a_password_in_a_message_or_a_traceback_never_reaches_the_line():
    # Lines from libraries (redis-py, psycopg, gunicorn) are not redacted where they
    # are written: the formatter is the last place a connection string can be caught.
    try:
        raise ConnectionError("cannot connect to postgresql://falcon:s3cret-pw@db:5432/falcon")
    except ConnectionError:
        entry = record("retrying %s", "redis://:s3cret-pw@127.0.0.1:6379/0")
        entry.exc_info = sys.exc_info()
    parsed = json.loads(JSONFormatter().format(entry))
    assert "s3cret-pw" not in json.dumps(parsed)
    assert parsed["msg"] == "retrying redis://:***@127.0.0.1:6379/0"
    assert "postgresql://falcon:***@db:5432/falcon" in parsed["exc"]


class StoppedClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_a_throttle_lets_one_line_through_per_interval_and_reports_what_it_held_back():
    clock = StoppedClock()
    throttle = LogThrottle(10.0, clock)
    assert throttle.admit() == 1, "the first event is always logged"
    assert [throttle.admit() for _ in range(4)] == [None] * 4, "events within the interval stay quiet"
    clock.now += 9.9
    assert throttle.admit(3) is None
    clock.now += 0.1
    assert throttle.admit() == 8, "the next line stands for itself and the 7 events held back (4 + 3)"
    clock.now += 10
    assert throttle.admit(2) == 2, "a quiet interval starts the count afresh"
