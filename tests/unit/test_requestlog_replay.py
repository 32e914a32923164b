"""The request log's replayer over a fake writer: when it may replay, what it writes, what a failure leaves behind.

Each test leaves rows in the spool (a previous outage), starts a log with a
short replay interval and synchronises on the spool's passes, never on time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from requestlog_fakes import (
    FOREVER,
    WAIT,
    FakeClock,
    FakeWriter,
    SignallingSpool,
    TransientError,
    make_log,
    make_row,
    open_breaker,
    records_on_disk,
    rows_total,
)

from falcon_svc.requestlog import RequestLog
from falcon_svc.requestlog.rows import row_record
from falcon_svc.requestlog.spool_files import REJECTED_GLOB
from falcon_svc.resilience import CircuitBreaker, State


@pytest.fixture
def writer() -> FakeWriter:
    return FakeWriter()


@pytest.fixture
def spool(tmp_path: Path) -> SignallingSpool:
    spool = SignallingSpool(tmp_path / "spool")
    spool.append([row_record(make_row(i)) for i in range(3)])  # what an earlier outage left behind
    spool.batches.clear()
    return spool


@pytest.fixture
def logs() -> Iterator[list[RequestLog]]:
    """Close every log a test made, so no thread outlives it."""
    made: list[RequestLog] = []
    yield made
    for log in made:
        log.close(timeout=0.5)
    join_request_log_threads()


def join_request_log_threads() -> None:
    """Wait for the writer and replayer threads to end: close() waits for the writer only, by design."""
    for thread in threading.enumerate():
        if thread.name.startswith("request-log"):
            thread.join(10)
            assert not thread.is_alive(), f"{thread.name} outlived its log"


def replaying(
    logs: list[RequestLog], writer: FakeWriter, spool: SignallingSpool, breaker: CircuitBreaker
) -> RequestLog:
    log = make_log(writer, spool, breaker, replay_interval=0.01)
    logs.append(log)
    log.start()
    return log


def half_open_breaker(clock: FakeClock, **hooks) -> CircuitBreaker:
    breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=60, clock=clock, **hooks)
    breaker.record_failure()
    clock.now += 60
    assert breaker.state is State.HALF_OPEN
    return breaker


def test_spooled_rows_are_replayed_counted_and_removed(logs, writer, spool):
    replayed = rows_total("replayed")
    log = replaying(logs, writer, spool, CircuitBreaker("postgres"))
    writer.wait_until(lambda w: w.stored, "the spooled rows are replayed")
    spool.wait_for_a_whole_pass()
    assert writer.stored == [["log-0", "log-1", "log-2"]]
    assert [call.operation for call in writer.calls] == ["replay_batch"]
    assert rows_total("replayed") - replayed == 3
    assert records_on_disk(spool.directory) == [], "a replayed file is deleted"
    assert log.status()["postgres"] == "up"
    # The pass got a connection ready before its clock started (so its rows/s are the
    # replay's, not a reconnecting pool's), and that was no trial call.
    assert writer.warm_ups >= 1 and writer.probes == 0, (writer.warm_ups, writer.probes)


def test_no_pass_starts_without_a_connection(logs, writer, spool):
    # A worker started during an outage has a closed breaker: its passes could only fail.
    writer.answers_warm_up = False
    replaying(logs, writer, spool, CircuitBreaker("postgres"))
    writer.wait_until(lambda w: w.warm_ups >= 2, "the replayer tries again")
    assert spool.replays == 0 and writer.calls == [], "a pass without a connection"
    assert records_on_disk(spool.directory) != [], "the rows wait in the spool"


def test_an_open_breaker_leaves_the_spool_alone(logs, writer, spool):
    breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=60, clock=FakeClock())
    breaker.record_failure()
    log = replaying(logs, writer, spool, breaker)
    spool.wait_for_a_whole_pass()
    assert spool.replays == 0 and writer.calls == [] and writer.probes == 0, "no call while the breaker is open"
    assert log.status()["postgres"] == "circuit_open"


def test_a_half_open_breaker_spends_its_trial_on_a_probe_and_a_failed_probe_reopens_it(logs, writer, spool):
    writer.failing = TransientError("connection refused")
    reopened = threading.Event()
    breaker = half_open_breaker(
        FakeClock(), on_transition=lambda _name, old, _new: reopened.set() if old is State.HALF_OPEN else None
    )
    log = replaying(logs, writer, spool, breaker)
    assert reopened.wait(10), "the half-open breaker's trial was never made"
    spool.wait_for_a_whole_pass()
    assert breaker.state is State.OPEN
    assert writer.probes == 1, "one trial call, then the open breaker refuses"
    assert spool.replays == 0 and writer.calls == [], "a failed probe must not be followed by a replay"
    assert log.status()["postgres"] == "circuit_open"


def test_a_successful_probe_closes_the_breaker_and_the_spool_is_replayed(logs, writer, spool):
    breaker = half_open_breaker(FakeClock())
    replaying(logs, writer, spool, breaker)
    writer.wait_until(lambda w: w.stored, "the spool is replayed after the probe")
    assert writer.probes == 1 and breaker.state is State.CLOSED
    assert writer.stored == [["log-0", "log-1", "log-2"]]
    assert writer.warm_ups == 0, "the trial call's round trip was the warm-up"


def test_no_probe_while_another_caller_holds_the_half_open_trial(logs, writer, spool):
    breaker = half_open_breaker(FakeClock())
    assert breaker.allow(), "this test takes the one trial call a half-open breaker admits"
    replaying(logs, writer, spool, breaker)
    spool.wait_for_a_whole_pass()
    spool.wait_for_a_whole_pass()
    assert breaker.state is State.HALF_OPEN, "the replayer made a trial call the breaker did not admit"
    assert writer.probes == 0 and spool.replays == 0


def test_a_failed_replay_keeps_the_rows_and_reports_postgres_down(logs, writer, spool):
    writer.failing = TransientError("connection refused")
    outcomes: list[bool] = []
    breaker = CircuitBreaker("postgres", failure_threshold=100, on_outcome=lambda _name, ok: outcomes.append(ok))
    log = replaying(logs, writer, spool, breaker)
    spool.wait_for_a_whole_pass()
    log.close(timeout=10)
    join_request_log_threads()
    # NOTE: once close() has begun a write is not retried, so the pass it cut short may
    # have made fewer than 3 attempts; every pass before it made 3.
    passes = -(-len(writer.calls) // 3)
    assert len(writer.calls) >= 3, f"a pass that writes makes 3 attempts: {len(writer.calls)} in all"
    assert {call.operation for call in writer.calls} == {"replay_batch"}
    assert outcomes == [False] * passes, "each failed pass is one failure on the breaker, never a success"
    assert log.status()["postgres"] == "down"
    assert sorted(record["log_id"] for record in records_on_disk(spool.directory)) == ["log-0", "log-1", "log-2"]


def test_a_row_the_database_refuses_is_set_aside_and_the_others_are_replayed(logs, writer, spool):
    writer.refused_ids = {"log-1"}
    replayed, dropped, rejected_rows = rows_total("replayed"), rows_total("dropped"), rows_total("rejected")
    log = replaying(logs, writer, spool, CircuitBreaker("postgres"))
    writer.wait_until(lambda w: len(w.calls) >= 4, "the batch and then its rows one by one are tried")
    spool.wait_for_a_whole_pass()
    assert [call.operation for call in writer.calls] == ["replay_batch", "replay_row", "replay_row", "replay_row"]
    assert writer.stored_ids() == ["log-0", "log-2"]
    assert rows_total("replayed") - replayed == 2
    assert rows_total("rejected") - rejected_rows == 1, "the refused row is counted as rejected"
    assert rows_total("dropped") == dropped, "a row kept for an operator is not lost"
    (rejected,) = spool.directory.glob(REJECTED_GLOB)
    assert json.loads(rejected.read_text())["log_id"] == "log-1", "the refused row is kept for an operator"
    assert records_on_disk(spool.directory) == [], "the spool file is done with"
    status = log.status()
    assert status["rejected_bytes"] == rejected.stat().st_size, f"the readiness detail shows them: {status}"


def test_the_replayer_deletes_expired_rejected_rows_even_while_the_breaker_is_open(logs, writer, spool):
    spool.reject([row_record(make_row(9))], reason="DataError: bad value")
    (rejected,) = spool.directory.glob(REJECTED_GLOB)
    week_and_a_day_ago = time.time() - 8 * 86_400
    os.utime(rejected, (week_and_a_day_ago, week_and_a_day_ago))
    log = replaying(logs, writer, spool, open_breaker())
    spool.wait_for_a_whole_pass()
    assert not rejected.exists(), "rejected rows past their retention are deleted whatever PostgreSQL's state"
    assert log.status()["rejected_bytes"] == 0
    assert len(records_on_disk(spool.directory)) == 3, "the spooled rows wait for PostgreSQL"


def test_a_spool_holding_only_rejected_rows_does_not_spend_the_half_open_trial(logs, writer, tmp_path):
    spool = SignallingSpool(tmp_path / "rejected-only")
    spool.directory.mkdir(parents=True)
    spool.reject([row_record(make_row(9))], reason="DataError: bad value")
    breaker = half_open_breaker(FakeClock())
    replaying(logs, writer, spool, breaker)
    spool.wait_for_a_whole_pass()
    assert writer.probes == 0 and spool.replays == 0, "rejected rows are never replayed: nothing waits"
    assert breaker.state is State.HALF_OPEN


def test_a_refused_row_in_a_large_batch_is_found_by_halving_not_row_by_row(logs, writer, tmp_path):
    spool = SignallingSpool(tmp_path / "large")
    spool.append([row_record(make_row(i)) for i in range(40)])
    writer.refused_ids = {"log-17"}
    rejected_before = rows_total("rejected")
    replaying(logs, writer, spool, CircuitBreaker("postgres"))
    writer.wait_until(lambda w: len(w.stored_ids()) == 39, "every row but the refused one is replayed")
    spool.wait_for_a_whole_pass()
    operations = [call.operation for call in writer.calls]
    # 40 -> 20 + 20 -> 10 + 10, and only the refused 10 row by row (ROW_BY_ROW_MAX is 16).
    assert operations.count("replay_row") == 10, f"halving should leave 10 rows to try singly: {operations}"
    assert len(operations) == 15, operations
    assert sorted(writer.stored_ids(), key=lambda i: int(i[4:])) == [f"log-{i}" for i in range(40) if i != 17]
    assert rows_total("rejected") - rejected_before == 1
    assert records_on_disk(spool.directory) == []


def test_the_readiness_detail_shows_the_backlog_then_the_replay_progress(logs, writer, spool):
    log = make_log(writer, spool, CircuitBreaker("postgres"), replay_interval=0.01)
    logs.append(log)
    before = log.status()["replay"]
    assert before["pending_bytes"] == spool.size_bytes(refresh=True) > 0, f"the backlog is not shown: {before}"
    assert before["replayed_rows"] == 0 and before["last_replayed_at"] is None, before
    log.start()
    writer.wait_until(lambda w: w.stored, "the spooled rows are replayed")
    spool.wait_for_a_whole_pass()
    after = log.status()["replay"]
    assert after["pending_bytes"] == 0, after
    assert after["replayed_rows"] == 3 and after["last_pass_rows"] == 3, after
    assert after["last_batch_rows_per_second"] > 0 and after["last_replayed_at"] is not None, after
    assert after["replaying"] is False, after


def test_a_write_that_succeeds_after_a_failed_one_starts_the_replay_at_once(logs, writer, spool):
    """PostgreSQL is back: the backlog goes now, not at the end of the replay interval (here: never)."""
    # Six failed attempts: the start-up replay pass's three and the first batch's three, in either order.
    writer.script.extend(TransientError("PostgreSQL is down") for _ in range(6))
    log = make_log(writer, spool, CircuitBreaker("postgres", failure_threshold=100), replay_interval=FOREVER)
    logs.append(log)
    log.start()
    for i in range(10, 13):
        log.submit(make_row(i))
    writer.wait_until(lambda w: len(w.calls) >= 6, "both failed three times")
    # NOTE: the batch is spooled right after its last attempt, outside the writer's view.
    deadline = time.monotonic() + WAIT
    while ["log-10", "log-11", "log-12"] not in spool.batches:
        assert time.monotonic() < deadline, f"the failed batch was not spooled: {spool.batches}"
        time.sleep(0.005)
    assert writer.stored_ids() == []
    for i in range(20, 23):
        log.submit(make_row(i))
    writer.wait_until(
        lambda w: {"log-0", "log-1", "log-2", "log-10", "log-11", "log-12"} <= set(w.stored_ids()),
        "the backlog was replayed",
    )
