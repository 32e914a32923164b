"""The request log's writer thread without a database: batching, the open breaker, failed writes, shutdown.

PostgreSQL is never reached here: either the breaker is open (the writer must not
try) or nothing listens on the port (every write fails). What PostgreSQL does with
the rows is tested against a real server in
tests/integration/test_request_log_postgres.py.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from servers import free_port

from falcon_svc import metrics
from falcon_svc.requestlog import LogRow, RequestLog, _copy_values, row_record
from falcon_svc.resilience import CircuitBreaker, RetryPolicy, State
from falcon_svc.spool import SPOOL_GLOB, Spool

# Long enough that a writer waiting it out fails the test's wait, which only a bug makes it do.
FOREVER = 3600.0
WAIT = 10.0


def make_row(i: int) -> LogRow:
    return LogRow(
        log_id=f"log-{i}",
        request_id=f"req-{i}",
        received_at=1.0,
        route="/v1/infer",
        method="POST",
        status=200,
        worker_id="test:1",
        model_version="v1",
        label="positive",
        confidence=0.9,
        n_texts=1,
        cache_hit=False,
        idempotent_replay=False,
        latency_ms=1.2,
        text_length=5,
        text_sha256="0" * 64,
    )


class SignallingSpool(Spool):
    """A real spool that tells the test what the writer and the replayer do with it.

    The replayer starts each pass with ``size_bytes(refresh=True)`` and ``replay``
    makes one more such call, so once ``refreshes`` has grown by 4 since a moment,
    a whole pass has started and finished after that moment.
    """

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, max_bytes=10**7, refresh_interval=0)
        self.batches: list[list[str]] = []
        self.appended = threading.Event()
        self.replays = 0
        self._refreshes = 0
        self._changed = threading.Condition()

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        stored = super().append(records)
        self.batches.append([record["log_id"] for record in records])
        self.appended.set()
        return stored

    def replay(self, *args: Any, **kwargs: Any) -> int:
        self.replays += 1
        return super().replay(*args, **kwargs)

    def size_bytes(self, *, refresh: bool = False) -> int:
        size = super().size_bytes(refresh=refresh)
        if refresh:
            with self._changed:
                self._refreshes += 1
                self._changed.notify_all()
        return size

    def wait_for_a_whole_pass(self) -> None:
        """Return once a replayer pass has started and finished since the call."""
        with self._changed:
            target = self._refreshes + 4
            assert self._changed.wait_for(lambda: self._refreshes >= target, WAIT), "the replayer stopped"


class BrokenSpool(SignallingSpool):
    """A spool with a bug: it raises (the real one promises never to)."""

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        raise RuntimeError("spool bug")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def write_attempts() -> float:
    return sample("falcon_dependency_call_duration_seconds_count", dependency="postgres", operation="write_batch")


def replay_attempts() -> float:
    return sample("falcon_dependency_call_duration_seconds_count", dependency="postgres", operation="replay_batch")


def write_seconds() -> float:
    return sample("falcon_dependency_call_duration_seconds_sum", dependency="postgres", operation="write_batch")


def retries() -> float:
    return sample("falcon_dependency_retries_total", dependency="postgres")


def open_breaker() -> CircuitBreaker:
    breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=FOREVER)
    breaker.record_failure()
    return breaker


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


def unreachable_log(logs: list[RequestLog], spool: Spool, breaker: CircuitBreaker, **overrides: Any) -> RequestLog:
    """A log whose PostgreSQL refuses connections (nothing listens on the port)."""
    params: dict[str, Any] = {
        "batch_size": 3,
        "flush_interval": FOREVER,
        "replay_interval": FOREVER,
        "pool_timeout": 0.2,
        "reconnect_timeout": 0.5,
        "sleep": lambda _delay: None,
    }
    params.update(overrides)
    log = RequestLog(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        spool,
        breaker,
        RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        **params,
    )
    logs.append(log)
    return log


class TestBatching:
    """A full batch goes at once, a partial one after flush_interval (the breaker is open: to the spool)."""

    def test_a_full_batch_goes_at_once_and_postgres_is_not_tried_while_the_breaker_is_open(self, logs, spool):
        attempts, retried = write_attempts(), retries()
        log = unreachable_log(logs, spool, open_breaker())
        log.start()
        for i in range(3):
            log.submit(make_row(i))
        assert spool.appended.wait(WAIT), "a full batch must not wait for flush_interval"
        assert spool.batches == [["log-0", "log-1", "log-2"]]
        assert (write_attempts(), retries()) == (attempts, retried), "an open breaker means no PostgreSQL call"

    def test_rows_queued_before_the_writer_starts_go_at_once(self, logs, spool):
        log = unreachable_log(logs, spool, open_breaker())
        for i in range(3):
            log.submit(make_row(i))
        log.start()
        assert spool.appended.wait(WAIT), "the writer must take what is already queued without waiting"
        assert spool.batches == [["log-0", "log-1", "log-2"]]

    def test_a_partial_batch_goes_after_flush_interval(self, logs, spool):
        log = unreachable_log(logs, spool, open_breaker(), flush_interval=0.05)
        log.start()
        log.submit(make_row(0))
        assert spool.appended.wait(WAIT), "a lone row must be flushed once flush_interval has passed"
        assert spool.batches == [["log-0"]]


def test_a_failed_write_is_retried_measured_and_reported_then_spooled(logs, spool):
    metrics.DEPENDENCY_UP.labels("postgres").set(1)
    attempts, seconds, retried = write_attempts(), write_seconds(), retries()
    log = unreachable_log(logs, spool, CircuitBreaker("postgres", failure_threshold=100))
    log.start()
    for i in range(3):
        log.submit(make_row(i))
    assert spool.appended.wait(WAIT), "the batch never reached the spool"
    assert spool.batches[0] == ["log-0", "log-1", "log-2"]
    assert write_attempts() - attempts == 3, "each of the 3 attempts is timed as a postgres write_batch call"
    assert write_seconds() - seconds < 3 * 60, "the histogram must get durations, not timestamps"
    assert retries() - retried >= 2, "the 2 retries of the batch are counted"
    assert log.status()["postgres"] == "down"
    assert sample("falcon_dependency_up", dependency="postgres") == 0


def test_submit_never_raises_even_if_the_spool_does(tmp_path, caplog):
    log = RequestLog(
        "postgresql://unused", BrokenSpool(tmp_path / "spool"), open_breaker(), RetryPolicy(), buffer_max=0
    )
    dropped = sample("falcon_request_log_rows_total", outcome="dropped")
    with caplog.at_level(logging.ERROR, logger="falcon_svc.requestlog"):
        log.submit(make_row(1))
    assert sample("falcon_request_log_rows_total", outcome="dropped") - dropped == 1
    (record,) = [record for record in caplog.records if record.name == "falcon_svc.requestlog"]
    assert record.levelno == logging.ERROR, "a dropped row is a bug: it must be logged loudly"
    assert record.exc_info is not None and "spool bug" in str(record.exc_info[1])


def test_close_returns_within_its_timeout_while_the_writer_is_stuck(logs, spool):
    """A writer held in its retry backoff must not hold up the worker's exit."""
    in_backoff, release = threading.Event(), threading.Event()

    def held_backoff(_delay: float) -> None:
        in_backoff.set()
        release.wait()

    log = unreachable_log(logs, spool, CircuitBreaker("postgres", failure_threshold=100), sleep=held_backoff)
    for i in range(3):
        log.submit(make_row(i))
    log.start()
    closer = threading.Thread(target=log.close, args=(0.2,))
    try:
        assert in_backoff.wait(WAIT), "the writer never failed its first attempt"
        closer.start()
        closer.join(WAIT)
        returned = not closer.is_alive()
    finally:
        release.set()
    closer.join()
    assert returned, "close() waited for the stuck writer instead of spooling its batch"
    for writer in [thread for thread in threading.enumerate() if thread.name == "request-log-writer"]:
        writer.join(WAIT)  # released, it fails its last attempts and must then leave the batch to close()
    assert spool.batches == [["log-0", "log-1", "log-2"]], "the batch is spooled once, by close(), which claimed it"


def test_the_writer_and_replayer_are_daemon_threads(logs, spool):
    """A thread stuck in PostgreSQL past close()'s deadline must not keep a stopping worker alive."""
    log = unreachable_log(logs, spool, open_breaker())
    log.start()
    names = ("request-log-writer", "request-log-replayer")
    threads = {thread.name: thread.daemon for thread in threading.enumerate() if thread.name in names}
    assert threads == dict.fromkeys(names, True)


def test_nul_and_lone_surrogates_are_replaced_not_dropped():
    row = make_row(1)
    row.text = "nul\x00 and lone \ud800 surrogate"
    assert _copy_values(row_record(row))[-1] == "nul\ufffd and lone ? surrogate"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records_in(spool: Spool) -> list[dict[str, Any]]:
    """Every record in the spool's files, read without replaying (or locking) anything."""
    paths = sorted(spool.directory.glob(SPOOL_GLOB))
    return [json.loads(line) for path in paths for line in path.read_bytes().splitlines()]


def spooled_before_start(spool: SignallingSpool, count: int = 3) -> None:
    """Rows a previous outage left in the spool, for the replayer to find."""
    spool.append([row_record(make_row(i)) for i in range(count)])


class TestReplayer:
    """The replayer with PostgreSQL unreachable: when it may try, and what a failure leaves behind."""

    def test_an_open_breaker_leaves_the_spool_alone(self, logs, spool):
        spooled_before_start(spool)
        replays = replay_attempts()
        breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=60, clock=FakeClock())
        breaker.record_failure()
        log = unreachable_log(logs, spool, breaker, replay_interval=0.01)
        log.start()
        spool.wait_for_a_whole_pass()
        assert spool.replays == 0 and replay_attempts() == replays, "no replay while the breaker is open"
        assert log.status()["postgres"] == "circuit_open"

    def test_a_half_open_breaker_spends_its_trial_on_a_probe_and_a_failed_probe_reopens_it(self, logs, spool):
        spooled_before_start(spool)
        metrics.DEPENDENCY_UP.labels("postgres").set(1)
        replays = replay_attempts()
        clock, reopened = FakeClock(), threading.Event()
        breaker = CircuitBreaker(
            "postgres",
            failure_threshold=1,
            reset_timeout=60,
            clock=clock,
            on_transition=lambda _name, old, new: reopened.set() if old is State.HALF_OPEN else None,
        )
        breaker.record_failure()
        log = unreachable_log(logs, spool, breaker, replay_interval=0.01)
        log.start()
        spool.wait_for_a_whole_pass()
        clock.now += 60  # half-open: the replayer's next pass makes the trial call
        assert reopened.wait(WAIT), "the half-open breaker's trial was never made"
        assert breaker.state is State.OPEN
        spool.wait_for_a_whole_pass()
        assert spool.replays == 0 and replay_attempts() == replays, "a failed probe must not be followed by a replay"
        assert sample("falcon_dependency_up", dependency="postgres") == 0

    def test_no_probe_while_another_caller_holds_the_half_open_trial(self, logs, spool):
        spooled_before_start(spool)
        clock = FakeClock()
        breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=60, clock=clock)
        breaker.record_failure()
        clock.now += 60
        assert breaker.allow(), "this test takes the one trial call a half-open breaker admits"
        log = unreachable_log(logs, spool, breaker, replay_interval=0.01)
        log.start()
        spool.wait_for_a_whole_pass()
        spool.wait_for_a_whole_pass()
        assert breaker.state is State.HALF_OPEN, "the replayer made a trial call the breaker did not admit"
        assert spool.replays == 0

    def test_a_failed_replay_keeps_the_rows_and_reports_postgres_down(self, logs, spool):
        spooled_before_start(spool)
        metrics.DEPENDENCY_UP.labels("postgres").set(1)
        replays = replay_attempts()
        log = unreachable_log(logs, spool, CircuitBreaker("postgres", failure_threshold=100), replay_interval=0.01)
        log.start()
        spool.wait_for_a_whole_pass()
        assert spool.replays >= 1
        assert replay_attempts() - replays >= 3, "each attempt is timed as a postgres replay_batch call"
        assert log.status()["postgres"] == "down"
        assert sample("falcon_dependency_up", dependency="postgres") == 0
        assert sorted(record["log_id"] for record in records_in(spool)) == ["log-0", "log-1", "log-2"]
