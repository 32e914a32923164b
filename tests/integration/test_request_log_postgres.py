"""The request log against a real PostgreSQL: migrations, batches, outages, restarts, a full spool, a locked table."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY
from servers import PostgresServer

from falcon_svc.requestlog import LogRow, PostgresWriter, RequestLog, Spool
from falcon_svc.requestlog.migrate import apply_migrations
from falcon_svc.requestlog.replay import REPLAY_BATCH_ROWS, Replayer
from falcon_svc.requestlog.rows import row_record
from falcon_svc.requestlog.spool_files import REJECTED_GLOB, SPOOL_GLOB
from falcon_svc.resilience import CircuitBreaker, RetryPolicy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres(module_postgres: PostgresServer) -> PostgresServer:
    return module_postgres


@pytest.fixture(scope="module")
def migrated(postgres: PostgresServer) -> str:
    apply_migrations(postgres.dsn)
    return postgres.dsn


@pytest.fixture
def dsn(migrated: str) -> str:
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("TRUNCATE request_log")
    return migrated


@pytest.fixture
def fresh_dsn(postgres: PostgresServer) -> str:
    name = f"m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.dsn.rsplit("/", 1)[0] + f"/{name}"


@contextlib.contextmanager
def outage(postgres: PostgresServer) -> Iterator[Callable[[], None]]:
    """Stop PostgreSQL like a crash; yield a function that brings it back; make sure it is back after."""
    postgres.stop("immediate")
    running = False

    def restart() -> None:
        nonlocal running
        postgres.start()
        running = True

    try:
        yield restart
    finally:
        if not running:
            postgres.start()


def make_row(i: int, run: str) -> LogRow:
    # NOTE: log_id (the primary key) differs from request_id, as in production, so a
    # writer or replay that confused the two would be caught.
    return LogRow(
        log_id=f"log-{run}-{i}",
        request_id=f"{run}-{i}",
        received_at=time.time(),
        route="/v1/infer",
        method="POST",
        status=200 if i % 10 else 422,
        worker_id="test:1",
        model_version="v1",
        label="positive" if i % 10 else None,
        confidence=0.875 if i % 10 else None,
        n_texts=1,
        cache_hit=i % 2 == 0,
        idempotent_replay=False,
        latency_ms=1.25,
        text_length=11,
        text_hmac="a" * 64,
        text="hello\tworld",
    )


def make_log(dsn: str, spool: Spool, **overrides) -> RequestLog:
    """A request log with short timeouts so outages play out in seconds."""
    params = {
        "buffer_max": 100,
        "batch_size": 50,
        "flush_interval": 0.05,
        "replay_interval": 0.2,
    }
    params.update(overrides)
    return RequestLog(
        PostgresWriter(dsn, pool_timeout=0.3, reconnect_timeout=1.0),
        spool,
        CircuitBreaker("postgres", failure_threshold=2, reset_timeout=0.5),
        RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        **params,
    )


def counts(dsn: str) -> tuple[int, int]:
    """Return (rows, distinct request ids) in request_log."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM request_log").fetchone()
    assert row is not None
    return row[0], row[1]


def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {within} s waiting until {what}")


def spooled_ids(directory: Path) -> list[str]:
    """Read the request ids in the spool files as they are on disk."""
    ids = []
    for path in sorted(directory.glob(SPOOL_GLOB)):
        ids.extend(json.loads(line)["request_id"] for line in path.read_bytes().splitlines())
    return ids


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def rows_total(outcome: str) -> float:
    return sample("falcon_request_log_rows_total", {"outcome": outcome})


def writer_is_blocked(observer: psycopg.Connection) -> bool:
    """Tell whether the request log's writer is waiting on a lock inside PostgreSQL."""
    row = observer.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'falcon-svc request log' AND wait_event_type = 'Lock'"
    ).fetchone()
    return row is not None and row[0] > 0


# NOTE: submit() costs microseconds; only a call that waits (for PostgreSQL, a lock)
# takes 100 ms, but a GC pause or a descheduled thread on a busy machine can too,
# now and then: hence a small allowance instead of a bound on the slowest call.
SLOW_SUBMIT_SECONDS = 0.1
SLOW_SUBMITS_ALLOWED = 0.02  # of all calls


def submit_all(log: RequestLog, rows: list[LogRow]) -> list[float]:
    """Submit ``rows``; return the durations of the calls over SLOW_SUBMIT_SECONDS."""
    slow = []
    for row in rows:
        started = time.perf_counter()
        log.submit(row)
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_SUBMIT_SECONDS:
            slow.append(elapsed)
    return slow


# --- migrations -------------------------------------------------------------------


def test_migrations_apply_once_and_create_the_table_and_indexes(fresh_dsn: str) -> None:
    assert apply_migrations(fresh_dsn) == ["0001", "0002"]
    assert apply_migrations(fresh_dsn) == [], "a second run must apply nothing"

    with psycopg.connect(fresh_dsn) as conn:
        versions = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
        indexes = {row[0] for row in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'request_log'")}
        columns = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'request_log'"
            ).fetchall()
        )
    assert versions == [("0001", "request_log"), ("0002", "partitioned_request_log")]
    # The runbook's queries all bound received_at: one cheap BRIN index serves them,
    # and the primary key is the only B-tree the writer pays for.
    assert any("USING brin (received_at)" in index for index in indexes), indexes
    assert len(indexes) == 2, indexes
    assert columns["received_at"] == "timestamp with time zone"
    assert columns["status"] == "smallint"
    assert columns["confidence"] == "double precision"
    assert "text_sha256" not in columns and columns["text_hmac"] == "text"
    assert len(columns) == 18


def test_concurrent_migration_runs_apply_each_version_once(fresh_dsn: str) -> None:
    barrier = threading.Barrier(3)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(apply_migrations(fresh_dsn))
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sorted(results) == [[], [], ["0001", "0002"]], "exactly one run should apply each version"


# --- writing ----------------------------------------------------------------------


def test_rows_are_written_in_batches_with_their_values(dsn: str, tmp_path: Path) -> None:
    batches_before = sample("falcon_request_log_batch_duration_seconds_count")
    written_before = sample("falcon_request_log_rows_total", {"outcome": "written"})
    spool = Spool(tmp_path / "spool", max_bytes=10**7)
    log = make_log(dsn, spool, buffer_max=1000, flush_interval=0.2)
    log.start()
    rows = [make_row(i, "batch") for i in range(500)]
    try:
        for row in rows:
            log.submit(row)
        wait_until(lambda: counts(dsn)[0] == 500, 15, "500 rows are in request_log")
        assert log.status()["postgres"] == "up"
    finally:
        log.close(timeout=5)

    batches = sample("falcon_request_log_batch_duration_seconds_count") - batches_before
    assert 10 <= batches <= 100, f"500 rows in batches of up to 50 took {batches} batches"
    assert sample("falcon_request_log_rows_total", {"outcome": "written"}) - written_before == 500
    assert spooled_ids(spool.directory) == []
    with psycopg.connect(dsn) as conn:
        stored = conn.execute(
            "SELECT received_at, route, method, status, label, confidence, cache_hit, text FROM request_log"
            " WHERE request_id = %s",
            (rows[0].request_id,),
        ).fetchone()
    assert stored is not None
    assert abs((stored[0] - datetime.fromtimestamp(rows[0].received_at, UTC)).total_seconds()) < 1e-5
    assert stored[1:] == ("/v1/infer", "POST", 422, None, None, True, None), "the raw text is off by default"


def test_raw_text_is_stored_only_when_enabled(dsn: str, tmp_path: Path) -> None:
    log = make_log(dsn, Spool(tmp_path / "spool", max_bytes=10**7), log_text=True)
    log.start()
    row = make_row(1, "text")
    row.text = "tab\tnewline\nnul\x00end"
    try:
        log.submit(row)
        wait_until(lambda: counts(dsn)[0] == 1, 10, "the row is written")
    finally:
        log.close(timeout=5)
    with psycopg.connect(dsn) as conn:
        stored = conn.execute("SELECT text FROM request_log").fetchone()
    assert stored == ("tab\tnewline\nnul\ufffdend",), "NUL (rejected by PostgreSQL) is replaced, the rest kept"


def test_rows_are_keyed_by_log_id_so_a_retried_row_lands_once_and_a_reused_request_id_twice(
    dsn: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    written_before = rows_total("written")
    log = make_log(dsn, Spool(spool_dir, max_bytes=10**7))
    original = make_row(1, "key")
    retried = dataclasses.replace(original)  # the same row again: a batch written twice
    resent = dataclasses.replace(original, log_id="log-key-resent")  # a client reusing its X-Request-ID
    log.start()
    try:
        for row in (original, retried, resent):
            log.submit(row)
        wait_until(lambda: rows_total("written") - written_before >= 3, 10, "the three rows are written")
    finally:
        log.close(timeout=5)
    assert spooled_ids(spool_dir) == [] and list(spool_dir.glob(REJECTED_GLOB)) == [], "a duplicate is not an error"
    with psycopg.connect(dsn) as conn:
        stored = sorted(conn.execute("SELECT log_id, request_id FROM request_log").fetchall())
    assert stored == [("log-key-1", "key-1"), ("log-key-resent", "key-1")], stored


# --- outages ----------------------------------------------------------------------


def test_an_outage_queues_then_spools_then_replays_every_row_once(
    postgres: PostgresServer, dsn: str, tmp_path: Path
) -> None:
    spooled_before, replayed_before = rows_total("spooled"), rows_total("replayed")
    spool = Spool(tmp_path / "spool", max_bytes=10**7, refresh_interval=0.1)
    log = make_log(dsn, spool, buffer_max=50)
    log.start()
    try:
        for i in range(100):
            log.submit(make_row(i, "outage"))
        wait_until(lambda: counts(dsn)[0] == 100, 10, "the rows before the outage are written")

        with outage(postgres) as restart:
            for i in range(100, 400):
                log.submit(make_row(i, "outage"))
                time.sleep(0.005)
            wait_until(lambda: log.status()["postgres"] == "circuit_open", 15, "the breaker opens")
            status = log.status()
            assert status["spool_bytes"] > 0, f"rows should be spooled during the outage: {status}"
            restart()

        wait_until(lambda: counts(dsn)[0] >= 400, 30, "every row is in request_log after the outage")
        assert counts(dsn) == (400, 400), "every request_id exactly once"
        assert list(spool.directory.glob(REJECTED_GLOB)) == []
        wait_until(lambda: log.status()["spool_bytes"] == 0, 10, "the spool is empty again")
        assert log.status()["postgres"] == "up"
        spooled, replayed = rows_total("spooled") - spooled_before, rows_total("replayed") - replayed_before
        assert spooled > 0, "no row was spooled: the outage test proved nothing"
        assert replayed >= spooled, f"{spooled} rows spooled but only {replayed} replayed"
    finally:
        log.close(timeout=5)


def test_close_during_an_outage_spools_everything_for_the_next_worker(
    postgres: PostgresServer, dsn: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    spooled_before, replayed_before = rows_total("spooled"), rows_total("replayed")
    old_worker = make_log(dsn, Spool(spool_dir, max_bytes=10**7))
    old_worker.start()
    with outage(postgres) as restart:
        for i in range(200):
            old_worker.submit(make_row(i, "restart"))
        started = time.monotonic()
        old_worker.close(timeout=1.0)
        assert time.monotonic() - started < 5, "close must respect its timeout while PostgreSQL is down"

        on_disk = spooled_ids(spool_dir)
        assert sorted(on_disk) == sorted(f"restart-{i}" for i in range(200)), "close must spool every row"
        assert rows_total("spooled") - spooled_before == 200, "each row is spooled (and counted) once"
        # NOTE: a copy of a spool file is what an interrupted, repeated replay looks
        # like to PostgreSQL: the same rows twice. They must still land once.
        first = sorted(spool_dir.glob(SPOOL_GLOB))[0]
        copied = len(first.read_bytes().splitlines())
        shutil.copy(first, spool_dir / (first.stem + "-copy.jsonl"))
        restart()

    new_worker = make_log(dsn, Spool(spool_dir, max_bytes=10**7))
    new_worker.start()
    try:
        wait_until(lambda: counts(dsn)[0] >= 200, 20, "the new worker replays the old worker's spool")
        wait_until(lambda: list(spool_dir.glob(SPOOL_GLOB)) == [], 10, "replayed files are deleted")
        assert counts(dsn) == (200, 200), "every request_id exactly once, duplicates in the spool included"
        assert list(spool_dir.glob(REJECTED_GLOB)) == [], "duplicates are not errors: nothing may be set aside"
        replayed = rows_total("replayed") - replayed_before
        assert replayed >= 200 + copied, f"{200 + copied} spooled lines, {replayed} counted as replayed"
    finally:
        new_worker.close(timeout=5)


def test_a_full_spool_drops_and_counts_rows_and_loses_nothing_else(
    postgres: PostgresServer, dsn: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    dropped_before = sample("falcon_request_log_rows_total", {"outcome": "dropped"})
    log = make_log(dsn, Spool(spool_dir, max_bytes=20_000, refresh_interval=0), buffer_max=10)
    log.start()
    with outage(postgres) as restart:
        for i in range(300):
            log.submit(make_row(i, "full"))
        log.close(timeout=1.0)
        dropped = sample("falcon_request_log_rows_total", {"outcome": "dropped"}) - dropped_before
        kept = spooled_ids(spool_dir)
        restart()

    assert dropped > 0, "the spool bound should have been hit"
    assert kept, "rows under the bound should be kept"
    assert len(kept) + dropped == 300, f"{len(kept)} kept + {dropped} dropped should be every row submitted"
    assert sum(path.stat().st_size for path in spool_dir.glob(SPOOL_GLOB)) <= 20_000

    replayed_before = rows_total("replayed")
    replayer = make_log(dsn, Spool(spool_dir, max_bytes=10**7))
    replayer.start()
    try:
        wait_until(lambda: counts(dsn)[0] >= len(kept), 20, "the kept rows are replayed")
        with psycopg.connect(dsn) as conn:
            stored = {row[0] for row in conn.execute("SELECT request_id FROM request_log")}
        assert stored == set(kept), "exactly the spooled rows land, once each"
        assert rows_total("replayed") - replayed_before >= len(kept), "the rows must land by replay"
    finally:
        replayer.close(timeout=5)


def test_a_locked_table_never_blocks_submit_and_rows_land_after_the_lock(dsn: str, tmp_path: Path) -> None:
    log = make_log(dsn, Spool(tmp_path / "spool", max_bytes=10**7), buffer_max=100)
    log.start()
    locker = psycopg.connect(dsn)
    observer = psycopg.connect(dsn, autocommit=True)
    rows = [make_row(i, "locked") for i in range(300)]
    try:
        locker.execute("LOCK TABLE request_log IN ACCESS EXCLUSIVE MODE")
        log.submit(rows[0])
        wait_until(lambda: writer_is_blocked(observer), 10, "the writer waits on the table lock")

        # The writer is stuck in PostgreSQL: the queue fills, then rows spill to the spool.
        spooled_before = rows_total("spooled")
        slow = submit_all(log, rows[1:])
        assert rows_total("spooled") - spooled_before > 0, "rows past the queue bound should be spooled"
        assert len(slow) <= (len(rows) - 1) * SLOW_SUBMITS_ALLOWED, (
            f"{len(slow)} of {len(rows) - 1} submits took over {SLOW_SUBMIT_SECONDS * 1000:.0f} ms "
            f"(slowest {max(slow) * 1000:.0f} ms): submit must not wait for PostgreSQL"
        )
        assert writer_is_blocked(observer), "the lock is held: the writer must still be waiting"
        locker.rollback()

        wait_until(lambda: counts(dsn)[0] >= 300, 20, "every row lands after the lock is released")
        assert counts(dsn) == (300, 300)
    finally:
        locker.close()
        observer.close()
        log.close(timeout=5)


def test_close_spools_the_batch_stuck_in_postgres_and_it_still_lands_once(dsn: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    rows = [make_row(i, "stuck") for i in range(80)]
    log = make_log(dsn, Spool(spool_dir, max_bytes=10**7), buffer_max=100, batch_size=50)
    for row in rows:
        log.submit(row)  # before start(): the writer's first batch is a full 50
    locker = psycopg.connect(dsn)
    observer = psycopg.connect(dsn, autocommit=True)
    try:
        locker.execute("LOCK TABLE request_log IN ACCESS EXCLUSIVE MODE")
        log.start()
        wait_until(lambda: writer_is_blocked(observer), 10, "the writer waits on the table lock mid-batch")
        log.close(timeout=0.5)
        # NOTE: read while the lock is still held: the writer cannot have saved the batch itself.
        on_disk = spooled_ids(spool_dir)
        locker.rollback()  # the stuck writer's transaction may now commit too
    finally:
        locker.close()
        observer.close()
    assert sorted(on_disk) == sorted(row.request_id for row in rows), "close() must spool the batch in flight"

    replayed_before = rows_total("replayed")
    replayer = make_log(dsn, Spool(spool_dir, max_bytes=10**7))
    replayer.start()
    try:
        wait_until(lambda: list(spool_dir.glob(SPOOL_GLOB)) == [], 20, "the spool is replayed")
    finally:
        replayer.close(timeout=5)
    assert rows_total("replayed") - replayed_before >= len(rows), "every spooled row must be replayed"
    assert counts(dsn) == (80, 80), "written by the stuck writer and replayed, each row is stored once"
    assert list(spool_dir.glob(REJECTED_GLOB)) == []


def test_a_row_postgres_rejects_does_not_block_the_rest_of_its_spool_file(dsn: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    good = [
        {"log_id": f"log-good-{i}", "request_id": f"good-{i}", "received_at": time.time(), "status": 200}
        for i in range(5)
    ]
    poison = {"log_id": "log-poison", "request_id": "poison", "received_at": None, "status": 200}  # NOT NULL
    lines = [json.dumps(record) for record in [*good[:2], poison, *good[2:]]]
    (spool_dir / "spool-00000000000000000001-1-000001.jsonl").write_text("\n".join(lines) + "\n")

    replayed_before, dropped_before = rows_total("replayed"), rows_total("dropped")
    rejected_before = rows_total("rejected")
    log = make_log(dsn, Spool(spool_dir, max_bytes=10**7))
    log.start()
    try:
        wait_until(lambda: list(spool_dir.glob(SPOOL_GLOB)) == [], 10, "the spool file is replayed and deleted")
    finally:
        log.close(timeout=5)
    with psycopg.connect(dsn) as conn:
        stored = {row[0] for row in conn.execute("SELECT request_id FROM request_log")}
    assert stored == {record["request_id"] for record in good}
    assert rows_total("replayed") - replayed_before >= len(good)
    assert rows_total("rejected") - rejected_before == 1, "the bad row is counted as rejected"
    assert rows_total("dropped") == dropped_before, "a row kept for an operator is not lost"
    (rejected,) = spool_dir.glob(REJECTED_GLOB)
    assert json.loads(rejected.read_text())["request_id"] == "poison", "the bad row is kept for an operator"


# --- replay at volume ---------------------------------------------------------------


def spool_rows(spool: Spool, run: str, rows: int, files: int) -> None:
    """Spool ``rows`` rows of run ``run`` in ``files`` sealed files, as workers spool through an outage."""
    per_file = rows // files
    for first in range(0, rows, per_file):
        for chunk in range(first, min(first + per_file, rows), 500):
            spool.append([row_record(make_row(i, run)) for i in range(chunk, min(chunk + 500, rows, first + per_file))])
        spool.seal()


def replayer_over(
    dsn: str, spool: Spool, write_hook: Callable[[], None] = lambda: None
) -> tuple[Replayer, PostgresWriter]:
    """A replayer with the production batch size and writer; ``write_hook`` runs after each committed batch."""
    writer = PostgresWriter(dsn, statement_timeout=120.0)
    writer.open()

    def write(records, operation: str) -> None:
        writer.write(records, operation=operation)
        write_hook()

    replayer = Replayer(
        spool,
        CircuitBreaker("postgres"),
        writer,
        write,
        batch_size=REPLAY_BATCH_ROWS,
        interval=3600.0,
        stopping=threading.Event(),
        report=lambda _ok: None,
    )
    return replayer, writer


def log_id_counts(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT log_id) FROM request_log").fetchone()
    assert row is not None
    return row[0], row[1]


WRITER_LOGGER = "falcon_svc.requestlog.postgres"


def decoded_fallbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the writer's lines saying a spooled batch was decoded in Python (not written as raw lines)."""
    return [r.getMessage() for r in caplog.records if r.name == WRITER_LOGGER and "as decoded rows" in r.getMessage()]


def test_a_large_spool_replays_exactly_once_and_again_changes_nothing(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = 30_000
    spool = Spool(tmp_path / "spool", max_bytes=10**9, refresh_interval=0)
    spool_rows(spool, "bulk", rows, files=3)
    shutil.copytree(spool.directory, tmp_path / "again")
    replayed_before = rows_total("replayed")
    batches_before = sample(
        "falcon_dependency_call_duration_seconds_count", {"dependency": "postgres", "operation": "replay_batch"}
    )
    replayer, writer = replayer_over(dsn, spool)
    try:
        with caplog.at_level(logging.INFO, logger=WRITER_LOGGER):
            replayer.replay_once()
        assert decoded_fallbacks(caplog) == [], "well-formed rows should be written as raw lines"
        assert log_id_counts(dsn) == (rows, rows), "every spooled row stored exactly once"
        assert list(spool.directory.glob(SPOOL_GLOB)) == [], "replayed files are deleted"
        assert rows_total("replayed") - replayed_before == rows
        progress = replayer.progress()
        assert progress["replayed_rows"] == rows and progress["last_pass_rows"] == rows, progress
        assert progress["last_batch_rows_per_second"] > 0, progress
        batches = sample(
            "falcon_dependency_call_duration_seconds_count", {"dependency": "postgres", "operation": "replay_batch"}
        )
        assert batches - batches_before == 3, f"each 10,000-row batch is one timed write: {batches - batches_before}"

        # The same files again (a replay repeated after its batches committed): all conflicts.
        again, _ = replayer_over(dsn, Spool(tmp_path / "again", max_bytes=10**9))
        again.replay_once()
        assert log_id_counts(dsn) == (rows, rows), "a second replay of the same rows stored duplicates"
    finally:
        writer.close()
    with psycopg.connect(dsn) as conn:
        stored = conn.execute(
            "SELECT request_id, received_at, text, confidence FROM request_log WHERE log_id = 'log-bulk-7'"
        ).fetchone()
    expected = make_row(7, "bulk")
    assert stored is not None and stored[0] == "bulk-7" and stored[2] == "hello\tworld", stored
    assert stored[3] == expected.confidence, "a value changed on its way through the raw-line replay"


def test_a_crash_after_a_batch_commits_replays_it_again_without_duplicates(dsn: str, tmp_path: Path) -> None:
    rows = REPLAY_BATCH_ROWS + 2_500  # two batches in one file: a boundary inside it
    spool = Spool(tmp_path / "spool", max_bytes=10**9, refresh_interval=0)
    spool_rows(spool, "crash", rows, files=1)
    committed = 0

    def crash_after_first_commit() -> None:
        nonlocal committed
        committed += 1
        if committed == 1:
            # The batch is committed, its file not yet done with: the worker dies here.
            raise psycopg.OperationalError("terminating connection due to administrator command")

    replayer, writer = replayer_over(dsn, spool, crash_after_first_commit)
    try:
        replayer.replay_once()
        assert log_id_counts(dsn) == (REPLAY_BATCH_ROWS, REPLAY_BATCH_ROWS), "the first batch was not committed"
        assert len(list(spool.directory.glob(SPOOL_GLOB))) == 1, "the file must stay until all of it is written"
        replayer.replay_once()
    finally:
        writer.close()
    assert log_id_counts(dsn) == (rows, rows), "the repeated batch was stored twice or a row was lost"
    assert list(spool.directory.glob(SPOOL_GLOB)) == []


def test_lines_postgres_cannot_parse_as_they_are_are_decoded_cleaned_or_skipped(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each file is replayed in a pass of its own (a pass would put them in one batch):
    # PostgreSQL refuses each as raw lines for a different reason.
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    now = time.time()

    def line(name: str, text: str) -> bytes:
        return json.dumps({"log_id": f"log-{name}", "request_id": name, "received_at": now, "text": text}).encode()

    files = [
        line("plain", 'back\\slash "q"') + b"\n" + line("nul", "a\x00b") + b"\n",  # NUL: no text value may hold it
        line("surrogate", "x\ud800y") + b"\n",  # a lone surrogate is not JSON PostgreSQL accepts
        line("kept", "k") + b"\nnot json at all\n" + b'{"log_id": "torn',  # an unreadable line, a torn last line
    ]
    dropped_before = rows_total("dropped")
    replayer, writer = replayer_over(dsn, Spool(spool_dir, max_bytes=10**7))
    try:
        for number, data in enumerate(files, start=1):
            (spool_dir / f"spool-{number:020d}-1-000001.jsonl").write_bytes(data)
            with caplog.at_level(logging.INFO, logger=WRITER_LOGGER):
                replayer.replay_once()
    finally:
        writer.close()
    assert len(decoded_fallbacks(caplog)) == 3, "each file should first be tried as raw lines, then decoded"
    with psycopg.connect(dsn) as conn:
        stored = dict(conn.execute("SELECT request_id, text FROM request_log").fetchall())
    # NOTE: the same cleaning as rows written from the queue (postgres._clean).
    expected = {"plain": 'back\\slash "q"', "nul": "a\ufffdb", "surrogate": "x?y", "kept": "k"}
    assert stored == expected, stored
    assert rows_total("dropped") - dropped_before == 2, "the unreadable line and the torn last line are dropped"
    assert list(spool_dir.glob(SPOOL_GLOB)) == [] and list(spool_dir.glob(REJECTED_GLOB)) == []


def test_warm_up_says_whether_postgres_answered_and_never_raises(dsn: str, postgres: PostgresServer) -> None:
    # The replayer warms the pool up before it times a pass, and skips a pass that
    # could only fail.
    writer = PostgresWriter(dsn, pool_timeout=0.5, connect_timeout=1)
    writer.open()
    try:
        assert writer.warm_up() is True
        with outage(postgres):
            assert writer.warm_up() is False
            with pytest.raises(psycopg.OperationalError):
                writer.probe()
    finally:
        writer.close()
