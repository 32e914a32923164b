"""The request log's replayer, one pass at a time: what its trial call reports, when it stops, what it keeps.

These drive ``Replayer.replay_once`` directly (no threads), over a real spool in a
temporary directory and the fake writer; each test pins a survivor of
``make mutation`` (docs/TESTING.md, "Mutation testing").
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from requestlog_fakes import FakeClock, FakeWriter, TransientError, make_row, records_on_disk, rows_total

from falcon_svc.requestlog import Spool
from falcon_svc.requestlog.replay import Replayer
from falcon_svc.requestlog.rows import row_record
from falcon_svc.resilience import CircuitBreaker, State

RESET_SECONDS = 30.0
REPLAY_LOGGER = "falcon_svc.requestlog.replay"


class Pass:
    """One replayer over a spool holding rows log-0, log-1, log-2 from an earlier outage."""

    def __init__(self, directory: Path, *, rows: int = 3, batch_size: int = 1) -> None:
        self.clock = FakeClock()
        self.writer = FakeWriter()
        self.spool = Spool(directory, 10**7)
        self.spool.append([row_record(make_row(i)) for i in range(rows)])
        self.breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=RESET_SECONDS, clock=self.clock)
        self.stopping = threading.Event()
        self.reports: list[bool] = []
        self.on_report: Callable[[bool], None] = lambda _ok: None
        self.before_write: Callable[[], None] = lambda: None
        self.replayer = Replayer(
            self.spool,
            self.breaker,
            self.writer,
            self._write,
            batch_size=batch_size,
            interval=3600.0,
            stopping=self.stopping,
            report=self._report,
        )

    def half_open(self) -> None:
        self.breaker.record_failure()
        self.clock.now += RESET_SECONDS
        assert self.breaker.state is State.HALF_OPEN, "the test's breaker did not reach half-open"

    def _write(self, records: Sequence[Mapping[str, Any]], operation: str) -> None:
        self.before_write()
        self.writer.write(records, operation=operation)

    def _report(self, ok: bool) -> None:
        self.reports.append(ok)
        self.on_report(ok)


@pytest.fixture
def replay(tmp_path: Path) -> Pass:
    return Pass(tmp_path / "spool")


def test_a_successful_trial_call_reports_postgres_up(replay: Pass) -> None:
    replay.half_open()
    replay.replayer.replay_once()
    assert replay.writer.probes == 1, "the half-open breaker's trial was not spent on a probe"
    assert replay.reports[0] is True, f"the probe's success was reported as {replay.reports[0]!r}"
    assert replay.writer.stored_ids() == ["log-0", "log-1", "log-2"], "the spool was not replayed after the probe"


def test_a_failed_trial_call_is_logged_with_its_cause(replay: Pass, caplog: pytest.LogCaptureFixture) -> None:
    replay.half_open()
    replay.writer.failing = TransientError("connection refused")
    with caplog.at_level(logging.INFO, logger=REPLAY_LOGGER):
        replay.replayer.replay_once()
    assert replay.reports == [False], f"a failed probe reported {replay.reports}"
    assert replay.writer.stored == [], "rows were written although PostgreSQL is down"
    messages = [record.getMessage() for record in caplog.records if record.name == REPLAY_LOGGER]
    assert messages == ["request-log: PostgreSQL still unavailable (TransientError: connection refused)"], messages


def test_a_successful_trial_call_logs_only_the_rows_replayed(replay: Pass, caplog: pytest.LogCaptureFixture) -> None:
    replay.half_open()
    with caplog.at_level(logging.INFO, logger=REPLAY_LOGGER):
        replay.replayer.replay_once()
    messages = [record.getMessage() for record in caplog.records if record.name == REPLAY_LOGGER]
    assert len(messages) == 1 and re.fullmatch(
        r"request-log: replayed 3 spooled rows in [\d.]+ s \(\d+ rows/s\)", messages[0]
    ), messages


def test_an_empty_spool_spends_no_trial_call(tmp_path: Path) -> None:
    empty = Pass(tmp_path / "spool", rows=0)
    empty.half_open()
    empty.replayer.replay_once()
    assert empty.writer.probes == 0, "an empty spool spent the half-open breaker's trial"
    assert empty.breaker.state is State.HALF_OPEN, "an empty spool changed the breaker's state"


def test_a_stop_during_a_pass_ends_it_after_the_current_batch(replay: Pass) -> None:
    replay.before_write = replay.stopping.set  # the worker exits while the first batch is written
    replay.replayer.replay_once()
    assert replay.writer.stored_ids() == ["log-0"], f"the pass went on after the stop: {replay.writer.stored}"
    on_disk = [record["log_id"] for record in records_on_disk(replay.spool.directory)]
    assert on_disk == ["log-0", "log-1", "log-2"], "the stopped pass's file was not kept whole for the next pass"


def test_a_breaker_opened_mid_pass_does_not_lose_the_remaining_batches(replay: Pass) -> None:
    # The writer thread's failures may open the breaker between two replayed batches:
    # the pass was admitted already, so its batches must still be written (or kept), never skipped.
    replay.on_report = lambda _ok: replay.breaker.record_failure() if len(replay.reports) == 1 else None
    replay.replayer.replay_once()
    stored = replay.writer.stored_ids()
    left = [record["log_id"] for record in records_on_disk(replay.spool.directory)]
    assert sorted(stored + left) == ["log-0", "log-1", "log-2"], f"rows lost: written {stored}, spooled {left}"
    assert stored == ["log-0", "log-1", "log-2"], f"the admitted pass skipped batches: written {stored}"


def test_a_refused_row_is_set_aside_with_postgres_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    replay = Pass(tmp_path / "spool", batch_size=3)
    replay.writer.refused_ids = {"log-1"}
    with caplog.at_level(logging.ERROR, logger="falcon_svc.requestlog"):
        replay.replayer.replay_once()
    assert replay.writer.stored_ids() == ["log-0", "log-2"], f"the good rows were not written: {replay.writer.stored}"
    messages = [record.getMessage() for record in caplog.records if record.name == REPLAY_LOGGER]
    assert messages == [
        "request-log: PostgreSQL rejected a replayed batch (refused ['log-1']); retrying its rows one by one"
    ], messages
    reasons = [getattr(record, "reason", None) for record in caplog.records if hasattr(record, "rejected_rows")]
    assert reasons == ["PoisonError: refused ['log-1']"], f"the rejection did not keep PostgreSQL's reason: {reasons}"


def test_a_batch_whose_rows_are_all_refused_counts_none_replayed(tmp_path: Path) -> None:
    replay = Pass(tmp_path / "spool", batch_size=3)
    replay.writer.refused_ids = {"log-0", "log-1", "log-2"}
    before = rows_total("replayed")
    replay.replayer.replay_once()
    assert replay.writer.stored == [], "a refused row was stored"
    assert rows_total("replayed") == before, "rows PostgreSQL refused were counted as replayed"


@pytest.mark.parametrize(
    ("error", "traceback"),
    [(TransientError("connection lost"), False), (RuntimeError("a bug in the writer"), True)],
    ids=["transient-no-traceback", "other-with-traceback"],
)
def test_a_failed_pass_says_why_and_keeps_the_rows(
    replay: Pass, caplog: pytest.LogCaptureFixture, error: Exception, traceback: bool
) -> None:
    replay.writer.failing = error
    with caplog.at_level(logging.INFO, logger=REPLAY_LOGGER):
        replay.replayer.replay_once()
    records = [record for record in caplog.records if record.name == REPLAY_LOGGER]
    expected = f"request-log: spool replay stopped ({type(error).__name__}: {error})"
    assert [record.getMessage() for record in records] == [expected], [record.getMessage() for record in records]
    assert bool(records[0].exc_info) is traceback, "an outage logs one line; anything else its traceback"
    assert len(records_on_disk(replay.spool.directory)) == 3, "a failed pass lost spooled rows"
