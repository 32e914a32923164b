"""The request log's queue and writer thread over a fake writer: batching, retries, the breaker, shutdown.

``FakeWriter`` (requestlog_fakes.py) stands in for PostgreSQL behind the ``Writer``
seam; what PostgreSQL does with the rows is tested against a real server in
tests/integration/test_request_log_postgres.py.
"""

from __future__ import annotations

import logging
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
    sample,
)

from falcon_svc.dependencies import make_breaker
from falcon_svc.requestlog import RequestLog, Spool
from falcon_svc.requestlog.queue import QUEUE_DEPTH_REPORT_EVERY
from falcon_svc.requestlog.spool_files import SPOOL_GLOB
from falcon_svc.resilience import CircuitBreaker, State
from falcon_svc.settings import Settings

# NOTE: a spool write takes microseconds; this bound is a thousand times that, so
# only a submit that waits for something (a lock, room in the queue) crosses it.
# A GC pause or a descheduled thread on a busy machine can too, now and then,
# hence a small allowance rather than a bound on the slowest call.
SLOW_SUBMIT_SECONDS = 0.1
SLOW_SUBMITS_ALLOWED = 0.02  # of all calls


@pytest.fixture
def writer() -> FakeWriter:
    return FakeWriter()


@pytest.fixture
def spool(tmp_path: Path) -> SignallingSpool:
    return SignallingSpool(tmp_path / "spool")


@pytest.fixture
def logs() -> Iterator[list[RequestLog]]:
    """Close every log a test made, so no writer thread outlives it."""
    made: list[RequestLog] = []
    yield made
    for log in made:
        log.close(timeout=0.5)


def started(logs: list[RequestLog], log: RequestLog, spool: SignallingSpool) -> RequestLog:
    """Start ``log`` (closed after the test) once its replayer is out of the way: see the spool's method."""
    logs.append(log)
    spool.start_after_the_first_replay_pass(log)
    return log


def spooled_ids(spool: Spool) -> list[str]:
    return [record["log_id"] for record in records_on_disk(spool.directory)]


def join_threads(log: RequestLog) -> None:
    for thread in log._threads:
        thread.join(WAIT)
        assert not thread.is_alive(), f"{thread.name} did not finish"


# --- submit: the request path ---------------------------------------------------


def test_submit_queues_a_row_and_the_writer_stores_it(logs, writer, spool):
    log = make_log(writer, spool, batch_size=1)
    log.submit(make_row(1))
    assert log.status()["queue_depth"] == 1, "submit queues the row"
    started(logs, log, spool)
    writer.wait_until(lambda w: w.stored_ids() == ["log-1"], "the row is written")
    assert spool.batches == [], "a written row is not spooled"


def test_submit_spools_when_the_queue_is_full(writer, spool):
    log = make_log(writer, spool, buffer_max=3)  # never started: nothing drains the queue
    spooled_before = rows_total("spooled")

    for i in range(10):
        log.submit(make_row(i))

    assert log.status()["queue_depth"] == 3
    assert rows_total("spooled") - spooled_before == 7
    assert spooled_ids(spool) == [f"log-{i}" for i in range(3, 10)], (
        "rows past the queue bound go to the spool, in order"
    )
    assert log.status()["spool_bytes"] == sum(path.stat().st_size for path in spool.directory.glob(SPOOL_GLOB))
    log.close(timeout=0.5)
    assert sorted(spooled_ids(spool)) == sorted(f"log-{i}" for i in range(10)), "close spools the queue too"
    assert writer.calls == [], "a log that was never started never writes"


def test_queue_depth_metric_grows_while_the_writer_is_busy(writer, spool):
    log = make_log(writer, spool)  # never started: like a writer stuck in a slow PostgreSQL

    for i in range(2 * QUEUE_DEPTH_REPORT_EVERY + 1):
        log.submit(make_row(i))

    assert sample("falcon_request_log_queue_depth") == 2 * QUEUE_DEPTH_REPORT_EVERY
    log.close(timeout=0.5)
    assert sample("falcon_request_log_queue_depth") == 0


def test_submit_survives_a_broken_spool(tmp_path: Path, writer):
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = make_log(writer, Spool(blocker / "spool", max_bytes=10**7), buffer_max=1)
    dropped_before = rows_total("dropped")
    for i in range(3):
        log.submit(make_row(i))
    assert rows_total("dropped") - dropped_before == 2, "rows that fit nowhere are counted as dropped"


def test_submit_never_raises_even_if_the_spool_does(tmp_path, writer, caplog):
    class BrokenSpool(Spool):
        def append(self, records):
            raise RuntimeError("spool bug")

    log = make_log(writer, BrokenSpool(tmp_path / "spool", max_bytes=10**7), buffer_max=0)
    dropped = rows_total("dropped")
    with caplog.at_level(logging.ERROR, logger="falcon_svc.requestlog"):
        log.submit(make_row(1))
    assert rows_total("dropped") - dropped == 1
    (record,) = [record for record in caplog.records if record.name.startswith("falcon_svc.requestlog")]
    assert record.levelno == logging.ERROR, "a dropped row is a bug: it must be logged loudly"
    assert record.exc_info is not None and "spool bug" in str(record.exc_info[1])


@pytest.mark.parametrize(("log_text", "stored"), [(False, None), (True, "kept")])
def test_submit_drops_the_raw_text_unless_asked_to_keep_it(writer, spool, log_text: bool, stored: str) -> None:
    # One row fits the queue (and is spooled by close), the next goes straight to the spool.
    log = make_log(writer, spool, buffer_max=1, log_text=log_text)
    log.submit(make_row(1, text="kept"))
    log.submit(make_row(2, text="kept"))
    assert [record["text"] for record in records_on_disk(spool.directory)] == [stored], "the row spooled by submit"
    log.close(timeout=0.1)
    assert [(r["log_id"], r["text"]) for r in records_on_disk(spool.directory)] == [
        ("log-2", stored),
        ("log-1", stored),
    ]


def test_submit_after_close_goes_to_the_spool(writer, spool):
    log = make_log(writer, spool)
    log.close(timeout=0.1)
    log.submit(make_row(1))
    spool.close()
    assert spooled_ids(spool) == ["log-1"]


def test_submit_stays_fast_while_the_queue_is_full(writer, spool):
    log = make_log(writer, spool, buffer_max=10)
    count = 200
    spooled_before = rows_total("spooled")
    slow = []
    for i in range(count):
        begun = time.perf_counter()
        log.submit(make_row(i))
        if time.perf_counter() - begun > SLOW_SUBMIT_SECONDS:
            slow.append(time.perf_counter() - begun)
    assert rows_total("spooled") - spooled_before == count - 10, "the calls measured must be the spooling ones"
    log.close(timeout=0.1)
    assert len(slow) <= count * SLOW_SUBMITS_ALLOWED, f"{len(slow)} of {count} submits were slow: {slow}"


def test_concurrent_submitters_lose_nothing(writer, spool):
    log = make_log(writer, spool, buffer_max=50)

    def submit_many(worker: int) -> None:
        for i in range(200):
            log.submit(make_row(worker * 1000 + i))

    threads = [threading.Thread(target=submit_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close(timeout=0.1)
    ids = spooled_ids(spool)
    assert len(ids) == len(set(ids)) == 800


# --- the writer thread: batches -----------------------------------------------------


class TestBatching:
    """A full batch goes at once, a partial one after flush_interval, rows queued before start at once."""

    def test_a_full_batch_goes_at_once(self, logs, writer, spool):
        log = started(logs, make_log(writer, spool), spool)
        for i in range(3):
            log.submit(make_row(i))
        writer.wait_until(lambda w: w.stored, "a full batch must not wait for flush_interval")
        assert writer.stored == [["log-0", "log-1", "log-2"]]
        assert [call.operation for call in writer.calls] == ["write_batch"]

    def test_rows_queued_before_the_writer_starts_go_at_once(self, logs, writer, spool):
        log = make_log(writer, spool)
        for i in range(4):
            log.submit(make_row(i))
        started(logs, log, spool)
        writer.wait_until(lambda w: w.stored, "the writer must take what is already queued without waiting")
        assert writer.stored[0] == ["log-0", "log-1", "log-2"], "one full batch, in order"

    def test_a_partial_batch_goes_after_flush_interval(self, logs, writer, spool):
        log = started(logs, make_log(writer, spool, flush_interval=0.05), spool)
        log.submit(make_row(0))
        writer.wait_until(lambda w: w.stored, "a lone row must be flushed once flush_interval has passed")
        assert writer.stored == [["log-0"]]

    def test_an_open_breaker_sends_batches_to_the_spool_without_calling_the_writer(self, logs, writer, spool):
        log = started(logs, make_log(writer, spool, open_breaker()), spool)
        for i in range(3):
            log.submit(make_row(i))
        assert spool.appended.wait(WAIT), "the batch never reached the spool"
        assert spool.batches == [["log-0", "log-1", "log-2"]]
        assert writer.calls == [], "an open breaker means no PostgreSQL call"
        assert log.status()["postgres"] == "circuit_open"


def test_a_written_batch_is_counted_timed_and_reports_postgres_up(logs, writer, spool):
    written, timed = rows_total("written"), sample("falcon_request_log_batch_duration_seconds_count")
    log = make_log(writer, spool)
    assert log.status()["postgres"] == "unknown", "nothing written yet"
    started(logs, log, spool)
    for i in range(3):
        log.submit(make_row(i))
    writer.wait_until(lambda w: w.stored, "the batch is written")
    log.close(timeout=WAIT)  # the writer thread has finished its bookkeeping once close returns
    assert rows_total("written") - written == 3
    assert sample("falcon_request_log_batch_duration_seconds_count") - timed == 1, "one batch, timed once"
    assert log.status()["postgres"] == "up"


# --- the writer thread: failures ---------------------------------------------------


def test_a_transient_failure_is_retried_with_capped_backoff_then_the_batch_is_spooled(logs, writer, spool):
    writer.failing = TransientError("connection refused")
    sleeps: list[float] = []
    retried = sample("falcon_dependency_retries_total", dependency="postgres")
    log = started(logs, make_log(writer, spool, sleep=sleeps.append), spool)
    for i in range(3):
        log.submit(make_row(i))
    assert spool.appended.wait(WAIT), "the batch never reached the spool"
    assert spool.batches == [["log-0", "log-1", "log-2"]]
    assert len(writer.calls) == 3, "a transient failure is tried max_attempts (3) times"
    assert len(sleeps) == 2 and max(sleeps) <= 0.05, f"two backoffs within the policy's cap: {sleeps}"
    assert sample("falcon_dependency_retries_total", dependency="postgres") - retried == 2
    assert log.status()["postgres"] == "down"


def test_a_transient_failure_then_success_writes_the_batch(logs, writer, spool):
    writer.script.append(TransientError("connection reset"))
    log = started(logs, make_log(writer, spool), spool)
    for i in range(3):
        log.submit(make_row(i))
    writer.wait_until(lambda w: w.stored, "the retry is written")
    assert writer.stored == [["log-0", "log-1", "log-2"]] and len(writer.calls) == 2
    assert spool.batches == [], "a batch written on retry is not spooled"


def test_a_failure_retrying_cannot_fix_is_not_retried_and_is_logged_with_its_traceback(logs, writer, spool, caplog):
    writer.failing = RuntimeError("relation request_log does not exist")
    with caplog.at_level(logging.WARNING, logger="falcon_svc.requestlog"):
        log = started(logs, make_log(writer, spool), spool)
        for i in range(3):
            log.submit(make_row(i))
        assert spool.appended.wait(WAIT), "the batch never reached the spool"
    assert len(writer.calls) == 1, "retrying cannot fix a missing table"
    (record,) = [r for r in caplog.records if "not written" in r.getMessage()]
    assert record.exc_info is not None, "an unexpected error is logged with its traceback"


def test_repeated_failures_open_the_breaker_and_every_row_is_spooled(logs, writer, spool):
    writer.failing = TransientError("connection refused")
    opened = threading.Event()
    breaker = CircuitBreaker(
        "postgres",
        failure_threshold=2,
        reset_timeout=FOREVER,
        on_transition=lambda _name, _old, new: opened.set() if new is State.OPEN else None,
    )
    log = started(logs, make_log(writer, spool, breaker), spool)
    for i in range(12):
        log.submit(make_row(i))
    assert opened.wait(WAIT), "two failed batches must open the breaker"
    log.close(timeout=WAIT)
    assert len(writer.calls) == 2 * 3, "two batches of 3 attempts, then the open breaker stops calling"
    assert sorted(spooled_ids(spool)) == sorted(f"log-{i}" for i in range(12)), "no row may be lost"
    assert log.status()["postgres"] == "circuit_open"


def test_falcon_dependency_up_follows_write_outcomes_through_the_breaker(logs, writer, spool):
    """The gauge is set by make_breaker's outcome hook; the request log only reports to the breaker."""
    breaker = make_breaker("postgres", Settings.from_env({}))
    log = started(logs, make_log(writer, spool, breaker, batch_size=1), spool)
    assert sample("falcon_dependency_up", dependency="postgres") == 1
    writer.failing = TransientError("connection refused")
    log.submit(make_row(1))
    assert spool.appended.wait(WAIT), "the failed row never reached the spool"
    assert sample("falcon_dependency_up", dependency="postgres") == 0, "a failed write marks PostgreSQL down"
    writer.failing = None
    log.submit(make_row(2))
    writer.wait_until(lambda w: w.stored, "the next row is written")
    log.close(timeout=WAIT)
    assert sample("falcon_dependency_up", dependency="postgres") == 1, "a written batch marks PostgreSQL up again"


# --- shutdown ----------------------------------------------------------------------


def test_start_opens_the_writer_and_close_flushes_the_queue_then_closes_it(writer, spool):
    log = make_log(writer, spool, batch_size=10)
    spool.start_after_the_first_replay_pass(log)
    assert writer.opened
    for i in range(5):
        log.submit(make_row(i))
    log.close(timeout=WAIT)
    assert writer.stored_ids() == [f"log-{i}" for i in range(5)], "close() flushes a partial batch at once"
    assert spool.batches == [] and writer.closed


def test_close_returns_while_the_writer_is_stuck_and_spools_its_batch_then_the_queue(writer, spool):
    log = make_log(writer, spool, batch_size=10)
    for i in range(15):
        log.submit(make_row(i))
    with writer.holding() as release:
        spool.start_after_the_first_replay_pass(log)
        assert writer.entered.wait(WAIT), "the writer never started its batch"
        assert log.status()["queue_depth"] == 5, "the writer should hold one batch of 10, leaving 5 queued"
        closer = threading.Thread(target=log.close, args=(0.2,))
        closer.start()
        closer.join(WAIT)
        returned = not closer.is_alive()
        # NOTE: read before the writer is released: it must not be the one that saves the batch.
        on_disk = spooled_ids(spool)
        writer.script.append(TransientError("connection reset"))
        release.set()
    closer.join()
    join_threads(log)
    assert returned, "close() waited for the stuck writer instead of spooling its batch"
    assert on_disk == [f"log-{i}" for i in range(15)], "close() must spool the batch in flight, then the queue"
    assert spooled_ids(spool) == on_disk, "the released writer must leave the batch close() claimed alone"
    assert len(writer.calls) == 1, "no retry past the close deadline"


def test_a_write_during_close_is_not_retried(writer, spool):
    """close() must be quick: a write that fails once it has begun is set aside, never retried after a backoff."""
    clock = FakeClock()
    log = make_log(writer, spool, clock=clock)
    for i in range(3):
        log.submit(make_row(i))
    writer.script.append(TransientError("connection reset"))
    with writer.holding() as release:
        spool.start_after_the_first_replay_pass(log)
        assert writer.entered.wait(WAIT), "the writer never started its batch"
        closer = threading.Thread(target=log.close, args=(30.0,))
        closer.start()
        clock.wait_for_reads(2)  # close() has its deadline and waits for the writer
        release.set()
    closer.join(WAIT)
    assert not closer.is_alive(), "close() should return once the batch is set aside"
    assert len(writer.calls) == 1, f"a write failing during close() was retried: {writer.calls}"
    assert spooled_ids(spool) == ["log-0", "log-1", "log-2"]


def test_a_write_during_close_waits_for_a_connection_at_most_the_time_left(writer, spool):
    clock = FakeClock()
    log = make_log(writer, spool, clock=clock, close_flush_seconds=5.0)
    for i in range(6):
        log.submit(make_row(i))  # two batches of 3
    with writer.holding() as release:
        spool.start_after_the_first_replay_pass(log)
        assert writer.entered.wait(WAIT), "the writer never started its first batch"
        closer = threading.Thread(target=log.close, args=(30.0,))
        closer.start()
        clock.wait_for_reads(2)  # close() has its deadline: 5 s (its flush budget, under the 30 s timeout)
        clock.now += 1
        release.set()
    closer.join(WAIT)
    assert not closer.is_alive(), "close() should return once the batches are written"
    first, second = writer.calls
    assert first.wait is None, "before close() a write waits as long as the writer's own limit"
    assert second.wait == 4.0, "during close() a write waits for a connection at most the flush budget left"
    assert writer.stored_ids() == [f"log-{i}" for i in range(6)] and spool.batches == []


def test_a_batch_taken_after_the_close_deadline_is_spooled_without_calling_the_writer(writer, spool):
    clock = FakeClock()
    log = make_log(writer, spool, clock=clock)
    for i in range(6):
        log.submit(make_row(i))  # two batches of 3
    with writer.holding() as release:
        spool.start_after_the_first_replay_pass(log)
        assert writer.entered.wait(WAIT), "the writer never started its first batch"
        assert clock.reads == 0, "nothing reads the clock before close() sets a deadline"
        closer = threading.Thread(target=log.close, args=(5.0,))
        closer.start()
        # NOTE: close() reads the clock once for its deadline, once more for how long to wait for the writer.
        clock.wait_for_reads(2)
        clock.now += 10  # the deadline passes while the first batch is being written
        release.set()
    closer.join(WAIT)
    assert not closer.is_alive(), "close() should return once the writer has finished"
    assert writer.stored == [["log-0", "log-1", "log-2"]], "the batch in progress is written"
    assert len(writer.calls) == 1, "no time is left for the second batch, so PostgreSQL is not tried"
    assert spooled_ids(spool) == ["log-3", "log-4", "log-5"]


def test_the_writer_and_replayer_are_daemon_threads(logs, writer, spool):
    """A thread stuck in PostgreSQL past close()'s deadline must not keep a stopping worker alive."""
    started(logs, make_log(writer, spool), spool)
    names = ("request-log-writer", "request-log-replayer")
    threads = {thread.name: thread.daemon for thread in threading.enumerate() if thread.name in names}
    assert threads == dict.fromkeys(names, True)
