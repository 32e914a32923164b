"""request_log retention against a real PostgreSQL: day partitions, the default partition, the CLI.

No waiting for days to pass: ``today`` is passed in (a fake clock), and backdated
partitions are made by running the maintenance as if on an earlier day.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from servers import PostgresServer
from test_request_log_postgres import make_row

from falcon_svc.requestlog import PostgresWriter
from falcon_svc.requestlog import retention as retention_module
from falcon_svc.requestlog.migrate import apply_migrations
from falcon_svc.requestlog.retention import DAYS_AHEAD, partition_name
from falcon_svc.requestlog.rows import row_record

pytestmark = pytest.mark.integration

TODAY = date(2026, 12, 1)
RETENTION = 30


@pytest.fixture(scope="module")
def postgres(module_postgres: PostgresServer) -> PostgresServer:
    return module_postgres


def new_database(postgres: PostgresServer) -> str:
    name = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def dsn(postgres: PostgresServer) -> str:
    """A fresh database, migrated as if on TODAY."""
    url = new_database(postgres)
    apply_migrations(url, today=TODAY)
    return url


def at(day: date, hour: int = 12) -> float:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp()


def write(dsn: str, *received: float, run: str = "r") -> list[str]:
    """Write one row per timestamp through the real writer; return their log ids."""
    rows = [dataclasses.replace(make_row(i, run), received_at=moment) for i, moment in enumerate(received)]
    writer = PostgresWriter(dsn, pool_timeout=5.0)
    writer.open()
    try:
        writer.write([row_record(row) for row in rows], operation="write_batch")
    finally:
        writer.close()
    return [row.log_id for row in rows]


def partitions(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'request_log'::regclass"
        ).fetchall()
    return {name for (name,) in rows}


def where(dsn: str, log_id: str) -> list[str]:
    """Return the partitions (tableoid) holding ``log_id``: one name per stored copy."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tableoid::regclass::text FROM request_log WHERE log_id = %s", (log_id,)).fetchall()
    return [name for (name,) in rows]


def backdate(dsn: str, day: date, days_ahead: int = 0) -> None:
    """Create the partitions of ``day`` (and ``days_ahead`` after it) as a run on that day would."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        retention_module.maintain(conn, today=day, retention_days=None, days_ahead=days_ahead)


def test_migrate_creates_the_days_ahead_and_a_default_partition(dsn: str) -> None:
    expected = {partition_name(TODAY + timedelta(days=n)) for n in range(DAYS_AHEAD + 1)}
    assert partitions(dsn) == expected | {"request_log_default"}
    with psycopg.connect(dsn) as conn:
        (key,) = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'request_log'::regclass "
            "AND contype = 'p'"
        ).fetchone() or ("",)
        brin = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%USING brin (received_at)%%'",
            (partition_name(TODAY),),
        ).fetchone()
    assert key == "PRIMARY KEY (log_id, received_at)", key
    assert brin == (1,), "each day partition has the BRIN index on received_at"


def test_migration_0002_keeps_the_rows_of_0001_in_their_days(postgres: PostgresServer) -> None:
    """An upgraded host: rows written under 0001 are in their day partitions after 0002, digests dropped."""
    from falcon_svc.requestlog.migrate import load_migrations

    url = new_database(postgres)
    first = load_migrations()[0]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(first.sql.encode())
        conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL, applied_at timestamptz)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES ('0001', 'request_log', now())")
        for n, day in enumerate((TODAY - timedelta(days=3), TODAY, TODAY)):
            conn.execute(
                "INSERT INTO request_log (log_id, request_id, received_at, text_sha256) "
                "VALUES (%s, 'r', to_timestamp(%s), repeat('a', 64))",
                (f"old-{n}", at(day)),
            )

    assert apply_migrations(url, today=TODAY) == ["0002"]

    assert where(url, "old-0") == [partition_name(TODAY - timedelta(days=3))], "an old day got its partition"
    assert where(url, "old-1") == where(url, "old-2") == [partition_name(TODAY)]
    with psycopg.connect(url) as conn:
        digests = conn.execute("SELECT count(*) FROM request_log WHERE text_hmac IS NOT NULL").fetchone()
        default = conn.execute("SELECT count(*) FROM request_log_default").fetchone()
    assert digests == (0,), "the unkeyed sha256 digests are not carried into text_hmac"
    assert default == (0,), "no row was left in the default partition"


def old_shape_database(postgres: PostgresServer, days: list[date]) -> str:
    """A database at migration 0001 (before partitioning) holding one row per day in ``days``."""
    from falcon_svc.requestlog.migrate import load_migrations

    url = new_database(postgres)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(load_migrations()[0].sql.encode())
        conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL, applied_at timestamptz)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES ('0001', 'request_log', now())")
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO request_log (log_id, request_id, received_at) VALUES (%s, 'r', to_timestamp(%s))",
                [(f"day-{day:%Y%m%d}", at(day)) for day in days],
            )
    return url


def test_migrating_a_populated_table_creates_today_first_and_no_partition_for_expired_rows(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """60 days of 0001 rows, 30 days' retention: 30 past partitions (not 60), today's created first."""
    days = [TODAY - timedelta(days=n) for n in range(60)]
    url = old_shape_database(postgres, days)
    monkeypatch.setenv("REQUEST_LOG_RETENTION_DAYS", str(RETENTION))  # migrate reads it as retention does
    caplog.set_level(logging.INFO, logger=retention_module.__name__)

    assert apply_migrations(url, today=TODAY) == ["0002"]

    cutoff = TODAY - timedelta(days=RETENTION)
    kept_days = [day for day in days if day >= cutoff]
    ahead = [TODAY + timedelta(days=n) for n in range(DAYS_AHEAD + 1)]
    expected = {partition_name(day) for day in kept_days + ahead}
    left = partitions(url)
    assert left - {"request_log_default"} == expected, f"unexpected: {sorted(left - expected)[:5]}..."
    created = [record.getMessage().split()[2] for record in caplog.records if record.getMessage().startswith("created")]
    assert created[: len(ahead)] == [partition_name(day) for day in ahead], (
        f"today and the days ahead come first: {created[:3]}"
    )
    with psycopg.connect(url) as conn:
        oldest = conn.execute("SELECT min(received_at) FROM request_log").fetchone()
        counts = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE tableoid = 'request_log_default'::regclass) FROM request_log"
        ).fetchone()
    assert counts == (len(kept_days), 0), "every kept row is in its day, none in the default partition"
    assert oldest is not None and oldest[0] == datetime.fromtimestamp(at(cutoff), UTC), "expired rows were not copied"
    assert "expired row(s)" not in caplog.text, "0002 never copied them (no copy-then-delete)"
    report = retention_module.run(url, today=TODAY, retention_days=RETENTION)
    assert (report.dropped, report.created, report.skipped) == ([], [], []), "the next retention run has nothing to do"


def test_a_locked_partition_is_skipped_and_the_rest_done_then_dropped_by_the_next_run(
    postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Another session's open transaction on an expired day: only that drop waits for the next run."""
    url = new_database(postgres)
    apply_migrations(url)
    today = datetime.now(UTC).date()  # the command's clock
    locked_day, free_day = today - timedelta(days=41), today - timedelta(days=40)
    backdate(url, locked_day, days_ahead=1)
    write(url, at(locked_day), at(free_day))
    missing = [today, today + timedelta(days=DAYS_AHEAD)]  # as on a host where earlier runs failed
    with psycopg.connect(url, autocommit=True) as conn:
        for day in missing:
            conn.execute(f"DROP TABLE {partition_name(day)}")
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("REQUEST_LOG_RETENTION_DAYS", str(RETENTION))
    monkeypatch.setattr(retention_module, "LOCK_TIMEOUT", "200ms")  # the lock is certain to be held: no race
    caplog.set_level(logging.INFO, logger=retention_module.__name__)
    start = datetime.combine(locked_day, datetime.min.time(), tzinfo=UTC)
    with psycopg.connect(url) as reader:  # a report (or pg_dump) with its transaction open
        reader.execute(
            "SELECT count(*) FROM request_log WHERE received_at >= %s AND received_at < %s",
            (start, start + timedelta(days=1)),
        ).fetchone()
        assert reader.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

        first = retention_module.command(argparse.Namespace(dry_run=False))

        left = partitions(url)
        stderr = capsys.readouterr().err
        reader.rollback()
    assert first == 1, "an incomplete run exits 1"
    assert {partition_name(day) for day in missing} <= left, "the partitions ahead were created despite the lock"
    # DROP locks request_log itself, so the reader holds up both drops; the second is not waited for.
    assert {partition_name(locked_day), partition_name(free_day)} <= left, "nothing dropped under the lock"
    assert "skipped 2 step(s)" in stderr, stderr
    assert f"drop {partition_name(locked_day)}: canceling statement due to lock timeout" in stderr, stderr
    assert f"drop {partition_name(free_day)}: not tried after that" in stderr, stderr
    assert any(
        record.levelname == "WARNING" and record.getMessage().startswith(f"skipped drop {partition_name(locked_day)}")
        for record in caplog.records
    ), caplog.text
    assert not any("dropped partition" in record.getMessage() for record in caplog.records), caplog.text

    assert retention_module.command(argparse.Namespace(dry_run=False)) == 0, capsys.readouterr().err
    left = partitions(url)
    assert not {partition_name(locked_day), partition_name(free_day)} & left, (
        "the lock released, the next run dropped them"
    )


def test_expired_partitions_are_dropped_and_the_rest_kept(dsn: str) -> None:
    cutoff = TODAY - timedelta(days=RETENTION)
    backdate(dsn, TODAY - timedelta(days=40), days_ahead=9)  # days -40 .. -31, all wholly expired
    backdate(dsn, cutoff, days_ahead=1)  # day -30 (the oldest kept) and -29
    old, last_expired, oldest_kept, recent = write(
        dsn, at(TODAY - timedelta(days=40)), at(cutoff - timedelta(days=1), 23), at(cutoff, 0), at(TODAY)
    )

    report = retention_module.run(dsn, today=TODAY, retention_days=RETENTION)

    left = partitions(dsn)
    dropped = {partition_name(TODAY - timedelta(days=n)) for n in range(31, 41)}
    assert {partition.name for partition in report.dropped} == dropped
    assert not dropped & left, f"expired partitions are still there: {sorted(dropped & left)}"
    assert {partition_name(cutoff), partition_name(cutoff + timedelta(days=1)), partition_name(TODAY)} <= left
    assert where(dsn, old) == [] and where(dsn, last_expired) == [], "expired rows went with their partitions"
    assert where(dsn, oldest_kept) == [partition_name(cutoff)], "a row of the oldest kept day stays"
    assert where(dsn, recent) == [partition_name(TODAY)]
    assert report.created == [], "the days ahead existed already"


def test_a_row_without_a_partition_lands_in_default_and_is_moved_not_lost(dsn: str) -> None:
    stray_day = TODAY + timedelta(days=DAYS_AHEAD + 3)  # no partition yet: the timer stopped for a while
    expired_day = TODAY - timedelta(days=RETENTION + 5)
    (stray,) = write(dsn, at(stray_day))
    (expired,) = write(dsn, at(expired_day), run="expired")
    assert where(dsn, stray) == ["request_log_default"], "the insert was taken, into the default partition"
    assert where(dsn, expired) == ["request_log_default"]

    report = retention_module.run(dsn, today=TODAY, retention_days=RETENTION)

    assert where(dsn, stray) == [partition_name(stray_day)], "the row moved to its day's new partition"
    assert where(dsn, expired) == [], "an expired row in the default partition is deleted"
    assert (report.default_rows_moved, report.default_rows_expired) == (1, 1), report
    assert partition_name(stray_day) in {partition.name for partition in report.created}
    # Replayed from the spool after the move: still one row (same log_id and received_at).
    write(dsn, at(stray_day))
    assert where(dsn, stray) == [partition_name(stray_day)], "a replayed row is stored once"


def test_a_dry_run_reports_and_changes_nothing(dsn: str) -> None:
    backdate(dsn, TODAY - timedelta(days=45))
    (stray,) = write(dsn, at(TODAY + timedelta(days=DAYS_AHEAD + 1)))
    before = partitions(dsn)

    report = retention_module.run(dsn, today=TODAY, retention_days=RETENTION, dry_run=True)

    assert [partition.name for partition in report.dropped] == [partition_name(TODAY - timedelta(days=45))]
    assert report.default_rows_moved == 1 and len(report.created) == 1, report
    assert partitions(dsn) == before and where(dsn, stray) == ["request_log_default"], "nothing changed"


def test_a_second_run_changes_nothing(dsn: str) -> None:
    backdate(dsn, TODAY - timedelta(days=50))
    first = retention_module.run(dsn, today=TODAY, retention_days=RETENTION)
    second = retention_module.run(dsn, today=TODAY, retention_days=RETENTION)
    assert len(first.dropped) == 1
    assert (second.dropped, second.created, second.default_rows_moved) == ([], [], 0), second


def dry_logged(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [json.loads(line)["msg"] for line in result.stdout.splitlines()]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "falcon_svc.cli", "retention", *args],
        env={**os.environ, "LOG_LEVEL": "info", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_drops_a_backdated_partition_and_says_so(postgres: PostgresServer) -> None:
    url = new_database(postgres)
    apply_migrations(url)
    today = datetime.now(UTC).date()
    backdated = today - timedelta(days=40)
    backdate(url, backdated)
    write(url, at(backdated))

    dry = _cli({"DATABASE_URL": url, "REQUEST_LOG_RETENTION_DAYS": "30"}, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert partition_name(backdated) in partitions(url), "--dry-run dropped nothing"
    done = _cli({"DATABASE_URL": url, "REQUEST_LOG_RETENTION_DAYS": "30"})

    assert done.returncode == 0, done.stderr
    logged = [json.loads(line)["msg"] for line in done.stdout.splitlines()]
    assert f"dropped partition {partition_name(backdated)} [{backdated:%Y-%m-%d} 00:00Z, " in logged[0], logged
    assert "dropped 1 partition(s)" in logged[-1], "the summary comes last"
    assert [line for line in logged if "would drop" in line] == [], "the real run is not a dry run"
    assert any(f"would drop partition {partition_name(backdated)}" in line for line in dry_logged(dry)), dry.stdout
    assert partition_name(backdated) not in partitions(url)


def test_the_command_fails_loudly_without_the_password_when_postgres_is_down() -> None:
    from servers import free_port

    url = f"postgresql://owner:s3cret-pw@127.0.0.1:{free_port()}/falcon"
    result = _cli({"DATABASE_URL": url})
    assert result.returncode == 1, result
    assert "retention: FAILED" in result.stderr, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr, "the password was printed"


def test_the_command_fails_on_an_unmigrated_database(postgres: PostgresServer) -> None:
    result = _cli({"DATABASE_URL": new_database(postgres)})
    assert result.returncode == 1
    assert "not a partitioned table: run `falcon-svc migrate` first" in result.stderr, result.stderr
