"""The request log without a database: submit never blocks or raises, failures end in the spool."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import PoolTimeout
from servers import free_port

from falcon_svc.requestlog import QUEUE_DEPTH_REPORT_EVERY, LogRow, RequestLog, _copy_values, is_transient, row_record
from falcon_svc.resilience import CircuitBreaker, RetryPolicy, State
from falcon_svc.spool import SPOOL_GLOB, Spool

# NOTE: a spool write takes microseconds; this bound is a thousand times that, so
# only a submit that waits for something (PostgreSQL, a lock, room in the queue)
# crosses it. A GC pause or a descheduled thread on a busy machine can too, now
# and then, hence a small allowance rather than a bound on the slowest call.
SLOW_SUBMIT_SECONDS = 0.1
SLOW_SUBMITS_ALLOWED = 0.02  # of all calls


def rows_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("falcon_request_log_rows_total", {"outcome": outcome}) or 0.0


def make_row(i: int, text: str | None = None) -> LogRow:
    return LogRow(
        log_id=f"log-{i}",
        request_id=f"req-{i}",
        received_at=time.time(),
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
        text=text,
    )


def spooled_ids(directory: Path) -> list[str]:
    ids: list[str] = []
    Spool(directory, max_bytes=10**9).replay(
        lambda batch: ids.extend(record["request_id"] for record in batch), batch_size=1000
    )
    return ids


def records_on_disk(directory: Path) -> list[dict]:
    """Read every spooled record as it is on disk, oldest file first, without replaying (or unlocking) anything."""
    return [json.loads(line) for path in sorted(directory.glob(SPOOL_GLOB)) for line in path.read_bytes().splitlines()]


def slow_calls(call: Callable[[int], object], count: int) -> list[float]:
    """Call ``call(i)`` for i in range(count); return the durations over SLOW_SUBMIT_SECONDS."""
    slow = []
    for i in range(count):
        started = time.perf_counter()
        call(i)
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_SUBMIT_SECONDS:
            slow.append(elapsed)
    return slow


def assert_submits_fast(slow: Sequence[float], count: int) -> None:
    assert len(slow) <= count * SLOW_SUBMITS_ALLOWED, (
        f"{len(slow)} of {count} submits took over {SLOW_SUBMIT_SECONDS * 1000:.0f} ms "
        f"(slowest {max(slow) * 1000:.0f} ms): submit must never wait"
    )


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def unreachable_log(spool_dir: Path, spool: Spool | None = None, **overrides) -> RequestLog:
    """A log whose PostgreSQL refuses connections (nothing listens on the port)."""
    params = {
        "buffer_max": 5,
        "batch_size": 10,
        "flush_interval": 0.01,
        "pool_timeout": 0.2,
        "reconnect_timeout": 0.5,
        "replay_interval": 0.1,
    }
    params.update(overrides)
    return RequestLog(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        spool or Spool(spool_dir, max_bytes=10**7, refresh_interval=0),
        CircuitBreaker("postgres", failure_threshold=2, reset_timeout=60),
        RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        **params,
    )


def test_submit_spools_when_the_queue_is_full(spool_dir: Path) -> None:
    log = unreachable_log(spool_dir, buffer_max=3)  # never started: nothing drains the queue
    spooled_before = rows_total("spooled")

    for i in range(10):
        log.submit(make_row(i))

    assert log.status()["queue_depth"] == 3
    assert rows_total("spooled") - spooled_before == 7
    overflow = [record["log_id"] for record in records_on_disk(spool_dir)]
    assert overflow == [f"log-{i}" for i in range(3, 10)], "the rows past the queue bound go to the spool, in order"
    assert log.status()["spool_bytes"] == sum(path.stat().st_size for path in spool_dir.glob(SPOOL_GLOB))
    log.close(timeout=0.5)
    assert sorted(spooled_ids(spool_dir)) == sorted(f"req-{i}" for i in range(10)), "close spools the queue too"


def test_queue_depth_metric_grows_while_the_writer_is_busy(spool_dir: Path) -> None:
    # Never started: like a writer blocked in a slow PostgreSQL, nothing takes rows.
    log = unreachable_log(spool_dir, buffer_max=100)

    for i in range(2 * QUEUE_DEPTH_REPORT_EVERY + 1):
        log.submit(make_row(i))

    assert REGISTRY.get_sample_value("falcon_request_log_queue_depth") == 2 * QUEUE_DEPTH_REPORT_EVERY
    log.close(timeout=0.5)
    assert REGISTRY.get_sample_value("falcon_request_log_queue_depth") == 0


def test_submit_survives_a_broken_spool(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = unreachable_log(blocker / "spool", buffer_max=1)
    dropped_before = rows_total("dropped")
    for i in range(3):
        log.submit(make_row(i))
    assert rows_total("dropped") - dropped_before == 2, "rows that fit nowhere are counted as dropped"


@pytest.mark.parametrize(("log_text", "stored"), [(False, None), (True, "kept")])
def test_submit_drops_the_raw_text_unless_asked_to_keep_it(spool_dir: Path, log_text: bool, stored: str) -> None:
    # One row fits the queue (and is spooled by close), the next goes straight to the spool.
    log = unreachable_log(spool_dir, buffer_max=1, log_text=log_text)
    log.submit(make_row(1, text="kept"))
    log.submit(make_row(2, text="kept"))
    assert [record["text"] for record in records_on_disk(spool_dir)] == [stored], "the row spooled by submit"
    log.close(timeout=0.1)
    assert [(r["log_id"], r["text"]) for r in records_on_disk(spool_dir)] == [("log-2", stored), ("log-1", stored)]


def test_submit_after_close_goes_to_the_spool(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=10**6)
    log = unreachable_log(spool_dir, spool)
    log.close(timeout=0.1)
    log.submit(make_row(1))
    spool.close()
    assert spooled_ids(spool_dir) == ["req-1"]


def test_submit_stays_fast_while_the_queue_is_full(spool_dir: Path) -> None:
    log = unreachable_log(spool_dir, buffer_max=10)
    count = 200
    spooled_before = rows_total("spooled")
    slow = slow_calls(lambda i: log.submit(make_row(i)), count)
    assert rows_total("spooled") - spooled_before == count - 10, "the calls measured must be the spooling ones"
    log.close(timeout=0.1)
    assert_submits_fast(slow, count)


def test_unreachable_postgres_opens_the_breaker_and_spools_every_row(spool_dir: Path) -> None:
    sleeps: list[float] = []
    log = unreachable_log(spool_dir, sleep=sleeps.append)
    log.start()
    try:
        for i in range(40):
            log.submit(make_row(i))
        deadline = time.monotonic() + 10
        while log.status()["postgres"] != "circuit_open" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.status()["postgres"] == "circuit_open"
    finally:
        log.close(timeout=1.0)
    assert sleeps, "transient errors should have been retried"
    assert max(sleeps) <= 0.05, "backoff should respect the policy's cap"
    assert sorted(spooled_ids(spool_dir)) == sorted(f"req-{i}" for i in range(40)), "no row may be lost"


def test_close_returns_within_its_timeout_when_postgres_is_unreachable(spool_dir: Path) -> None:
    log = unreachable_log(spool_dir, pool_timeout=5.0)
    log.start()
    for i in range(30):
        log.submit(make_row(i))
    started = time.monotonic()
    log.close(timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert sorted(spooled_ids(spool_dir)) == sorted(f"req-{i}" for i in range(30))


def test_close_spools_the_batch_the_writer_is_stuck_on(spool_dir: Path) -> None:
    """close() while the writer holds a batch (here: in its retry backoff) must spool that batch too."""
    in_backoff = threading.Event()
    release = threading.Event()

    def held_backoff(_delay: float) -> None:
        in_backoff.set()
        release.wait(30)

    log = unreachable_log(spool_dir, buffer_max=100, batch_size=10, sleep=held_backoff)
    for i in range(15):
        log.submit(make_row(i))
    log.start()
    try:
        assert in_backoff.wait(10), "the writer never failed its first attempt"
        assert log.status()["queue_depth"] == 5, "the writer should hold one batch of 10, leaving 5 queued"
        log.close(timeout=0.2)
        # NOTE: read before the writer is released: it must not be the one that saves the batch.
        on_disk = [record["log_id"] for record in records_on_disk(spool_dir)]
    finally:
        release.set()
    assert on_disk == [f"log-{i}" for i in range(15)], "close() must spool the batch in flight, then the queue"


def test_concurrent_submitters_lose_nothing(spool_dir: Path) -> None:
    log = unreachable_log(spool_dir, buffer_max=50)

    def submit_many(worker: int) -> None:
        for i in range(200):
            log.submit(make_row(worker * 1000 + i))

    threads = [threading.Thread(target=submit_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close(timeout=0.1)
    ids = spooled_ids(spool_dir)
    assert len(ids) == len(set(ids)) == 800


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.OperationalError("connection refused"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.QueryCanceled("statement timeout"), True),
        (PoolTimeout("no connection"), True),
        (psycopg.errors.UndefinedTable("no request_log"), False),
        (psycopg.DataError("bad value"), False),
        (ValueError("bug"), False),
    ],
)
def test_only_transient_errors_are_retried(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_copy_values_make_strings_postgres_would_reject_safe() -> None:
    row = make_row(1, text="nul\x00 and lone \ud800 surrogate")
    values = _copy_values(row_record(row))
    text = values[-1]
    assert "\x00" not in text
    text.encode("utf-8")  # must not raise


def test_breaker_state_open_reads_as_circuit_open(spool_dir: Path) -> None:
    breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=60)
    log = RequestLog("postgresql://unused", Spool(spool_dir, max_bytes=0), breaker, RetryPolicy())
    assert log.status()["postgres"] == "unknown"
    breaker.record_failure()
    assert breaker.state is State.OPEN
    assert log.status()["postgres"] == "circuit_open"
