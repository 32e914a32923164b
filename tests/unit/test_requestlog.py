"""The request log without a database: submit never blocks or raises, failures end in the spool."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import PoolTimeout
from servers import free_port

from falcon_svc.requestlog import QUEUE_DEPTH_REPORT_EVERY, LogRow, RequestLog, _copy_values, is_transient, row_record
from falcon_svc.resilience import CircuitBreaker, RetryPolicy, State
from falcon_svc.spool import Spool


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


def test_submit_spools_when_the_queue_is_full_and_never_raises(spool_dir: Path) -> None:
    log = unreachable_log(spool_dir, buffer_max=3)  # never started: nothing drains the queue
    spooled_before = rows_total("spooled")

    for i in range(10):
        assert log.submit(make_row(i)) is None

    assert log.status()["queue_depth"] == 3
    assert rows_total("spooled") - spooled_before == 7
    assert log.status()["spool_bytes"] > 0
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


def test_submit_drops_the_raw_text_unless_asked_to_keep_it(spool_dir: Path) -> None:
    private = unreachable_log(spool_dir / "a", buffer_max=1)
    keeping = unreachable_log(spool_dir / "b", buffer_max=1, log_text=True)
    row_a, row_b = make_row(1, text="secret"), make_row(2, text="kept")
    private.submit(row_a)
    keeping.submit(row_b)
    assert row_a.text is None
    assert row_b.text == "kept"


def test_submit_after_close_goes_to_the_spool(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=10**6)
    log = unreachable_log(spool_dir, spool)
    log.close(timeout=0.1)
    log.submit(make_row(1))
    spool.close()
    assert spooled_ids(spool_dir) == ["req-1"]


def test_submit_stays_fast_while_the_queue_is_full(spool_dir: Path) -> None:
    log = unreachable_log(spool_dir, buffer_max=10)
    slowest = 0.0
    for i in range(500):
        started = time.perf_counter()
        log.submit(make_row(i))
        slowest = max(slowest, time.perf_counter() - started)
    log.close(timeout=0.1)
    assert slowest < 0.1, f"submit took {slowest * 1000:.1f} ms"


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
