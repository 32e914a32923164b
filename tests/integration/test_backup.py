"""The nightly backup (scripts/backup_request_log.sh) and the restore drill, against a real PostgreSQL.

The script runs as the timer runs it (bash, the real pg_dump and pg_restore); the
run's UTC stamp comes from BACKUP_TIMESTAMP, so several "nights" take no waiting.
The drill follows docs/RUNBOOK.md "Restore the request log" step by step.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from servers import PostgresServer, free_port
from test_request_log_postgres import make_row
from tools import require_tool

from falcon_svc.requestlog import PostgresWriter, retention
from falcon_svc.requestlog.migrate import apply_migrations
from falcon_svc.requestlog.retention import partition_name
from falcon_svc.requestlog.rows import row_record

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "backup_request_log.sh"
RUNBOOK = REPO / "docs" / "RUNBOOK.md"
TODAY = date(2026, 12, 1)
# Rows per day: several day partitions, and one day far ahead that has no partition
# yet, so its row is in request_log_default.
ROWS_PER_DAY = {TODAY - timedelta(days=2): 5, TODAY - timedelta(days=1): 7, TODAY: 11, TODAY + timedelta(days=60): 1}
# The runbook's salvage and merge statements, run here as written there.
SALVAGE_SQL = "CREATE TABLE request_log_salvage AS TABLE request_log;"
DROP_SQL = "DROP TABLE request_log CASCADE;"
MERGE_SQL = "INSERT INTO request_log SELECT * FROM request_log_salvage ON CONFLICT (log_id, received_at) DO NOTHING;"


@pytest.fixture(scope="module")
def pg_bin() -> str:
    """The directory of the server's own pg_dump and pg_restore (no older client on PATH)."""
    return str(Path(require_tool("pg_dump", "postgresql", ("/usr/lib/postgresql/*/bin",))).parent)


@pytest.fixture
def dsn(module_postgres: PostgresServer) -> str:
    """A fresh database of its own, migrated as if on TODAY, with rows across the days of ROWS_PER_DAY."""
    name = f"b_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(module_postgres.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = module_postgres.dsn.rsplit("/", 1)[0] + f"/{name}"
    apply_migrations(url, today=TODAY)
    with psycopg.connect(url, autocommit=True) as conn:
        for day in ROWS_PER_DAY:
            if day < TODAY:  # the partitions a run of the retention job on that day made
                retention.maintain(conn, today=day, retention_days=None, days_ahead=0)
    for day, count in ROWS_PER_DAY.items():
        write(url, day, count, run=f"seed{day:%Y%m%d}")
    return url


def write(dsn: str, day: date, count: int, run: str, writer: PostgresWriter | None = None) -> None:
    """Write ``count`` rows received on ``day`` through the real writer (texts with newlines and COPY's \\.)."""
    moment = datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()
    rows = [
        dataclasses.replace(make_row(i, run), received_at=moment + i, text="two\nlines\n\\.\n" if i % 2 else "tab\tbed")
        for i in range(count)
    ]
    own = writer is None
    writer = writer or PostgresWriter(dsn, pool_timeout=5.0)
    writer.open()
    try:
        writer.write([row_record(row) for row in rows], operation="write_batch")
    finally:
        if own:
            writer.close()


def counts(dsn: str) -> dict[str, int]:
    """Return {partition: rows} of request_log, partitions without rows included."""
    with psycopg.connect(dsn) as conn:
        names = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'request_log'::regclass"
        ).fetchall()
        return {name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for (name,) in names}


def run_script(pg_bin: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PATH": f"{pg_bin}:{os.environ['PATH']}", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=120, check=False
    )


def backup(pg_bin: str, dsn: str, directory: Path, stamp: str, keep: int | str = 7) -> subprocess.CompletedProcess:
    return run_script(
        pg_bin, BACKUP_DIR=str(directory), BACKUP_KEEP=str(keep), BACKUP_DATABASE=dsn, BACKUP_TIMESTAMP=stamp
    )


def stamp(night: int) -> str:
    """The UTC stamp of the night'th run, 03:00 each night from TODAY."""
    return f"{TODAY + timedelta(days=night):%Y%m%d}T030000Z"


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def dump_rows(pg_bin: str, path: Path) -> dict[str, int]:
    result = run_script(pg_bin, "rows", str(path))
    assert result.returncode == 0, result.stderr
    return {table: int(rows) for table, rows in (line.split("\t") for line in result.stdout.splitlines())}


def test_a_backup_is_a_whole_dump_of_every_partition_under_a_utc_name(pg_bin: str, dsn: str, tmp_path: Path) -> None:
    result = backup(pg_bin, dsn, tmp_path, stamp(0))

    assert result.returncode == 0, result.stderr
    dump = tmp_path / f"falcon-{stamp(0)}.dump"
    assert listing(tmp_path) == [dump.name], "one dump, no temporary file left"
    assert dump.stat().st_mode & 0o777 == 0o600, "request_log holds client data: the dump is its owner's only"
    assert dump.read_bytes()[:5] == b"PGDMP", "pg_dump's custom format"
    total = sum(ROWS_PER_DAY.values())
    line = result.stdout.strip()
    assert re.fullmatch(
        rf"falcon-svc-backup: wrote {re.escape(str(dump))} \({dump.stat().st_size} bytes, {total} request_log rows "
        rf"in \d+ partitions, \d+\.\d s\); keeping the newest 7, deleted 0: none ?",
        line,
    ), f"not the one log line a run promises: {line!r}"

    in_dump = dump_rows(pg_bin, dump)
    expected = counts(dsn)
    assert {table: rows for table, rows in in_dump.items() if table.startswith("request_log")} == expected
    assert expected[partition_name(TODAY)] == ROWS_PER_DAY[TODAY] and expected["request_log_default"] == 1
    assert in_dump["schema_migrations"] == 2, "the whole database, the migrations' record included"


def test_only_the_newest_keep_dumps_stay_and_never_is_the_one_just_written_deleted(
    pg_bin: str, dsn: str, tmp_path: Path
) -> None:
    unrelated = ["falcon-manual-before-upgrade.dump", "notes.txt"]
    for name in unrelated:
        (tmp_path / name).write_text("an operator's file")

    for night in range(5):
        result = backup(pg_bin, dsn, tmp_path, stamp(night), keep=3)
        assert result.returncode == 0, result.stderr
    assert listing(tmp_path) == sorted([f"falcon-{stamp(n)}.dump" for n in (2, 3, 4)] + unrelated)
    assert f"deleted 1: falcon-{stamp(1)}.dump" in result.stdout, result.stdout

    # A clock set back: the run's dump is older than every kept one, and still kept.
    result = backup(pg_bin, dsn, tmp_path, stamp(-10), keep=3)
    assert result.returncode == 0, result.stderr
    assert listing(tmp_path) == sorted([f"falcon-{stamp(n)}.dump" for n in (-10, 3, 4)] + unrelated)

    result = backup(pg_bin, dsn, tmp_path, stamp(5), keep=1)
    assert result.returncode == 0, result.stderr
    assert listing(tmp_path) == sorted([f"falcon-{stamp(5)}.dump", *unrelated])


@pytest.mark.parametrize(
    "breakage",
    [
        "unreachable",
        "no such database",
        "truncated dump",
        "keep of 0",
        "keep not a number",
        "same stamp twice",
        "no directory",
    ],
)
def test_a_failed_run_deletes_nothing_and_says_why(pg_bin: str, dsn: str, tmp_path: Path, breakage: str) -> None:
    for night in range(3):
        assert backup(pg_bin, dsn, tmp_path, stamp(night)).returncode == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    directory, database, keep, night = tmp_path, dsn, "1", 3
    if breakage == "unreachable":
        database = f"postgresql://postgres@127.0.0.1:{free_port()}/falcon?connect_timeout=3"
    elif breakage == "no such database":
        database = dsn.rsplit("/", 1)[0] + "/no_such_database"
    elif breakage == "truncated dump":  # a pg_dump that exits 0 having written half the archive
        stub = tmp_path.parent / f"{tmp_path.name}-bin"
        stub.mkdir()
        (stub / "pg_dump").write_text(
            f'#!/bin/sh\n{pg_bin}/pg_dump "$@" || exit\n'
            "for arg; do case $arg in --file=*) f=${arg#--file=};; esac; done\n"
            'truncate -s $(($(stat -c %s "$f") / 2)) "$f"\n'
        )
        (stub / "pg_dump").chmod(0o755)
        pg_bin = f"{stub}:{pg_bin}"
    elif breakage == "keep of 0":
        keep = "0"
    elif breakage == "keep not a number":
        keep = "seven"
    elif breakage == "same stamp twice":
        night = 2
    else:
        directory = tmp_path / "missing"

    result = backup(pg_bin, database, directory, stamp(night), keep=keep)

    assert result.returncode != 0, f"{breakage}: the run must fail: {result.stdout}"
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("falcon-svc-backup: FAILED: "), result.stderr
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before, (
        f"{breakage}: a failed run changed the backups: {result.stderr}"
    )
    if breakage in ("unreachable", "no such database"):
        assert "pg_dump of" in message[0] and "nothing deleted" in message[0], message[0]
    if breakage == "truncated dump":
        assert "cannot be read back, nothing deleted" in message[0], message[0]


def test_restoring_the_parent_by_name_brings_back_no_rows(pg_bin: str, dsn: str, tmp_path: Path) -> None:
    """Why the runbook restores with a list file: `pg_restore -t request_log` restores the parent table only."""
    assert backup(pg_bin, dsn, tmp_path, stamp(0)).returncode == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DROP_SQL)
    subprocess.run(
        [f"{pg_bin}/pg_restore", "-t", "request_log", f"--dbname={dsn}", str(tmp_path / f"falcon-{stamp(0)}.dump")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT count(*) FROM request_log").fetchone()
    assert counts(dsn) == {} and rows == (0,), "pg_restore -t now restores the partitions too: simplify the runbook"


def test_restore_drill_brings_back_every_partitions_rows(pg_bin: str, dsn: str, tmp_path: Path) -> None:
    """docs/RUNBOOK.md "Restore the request log": salvage, drop, restore the last dump, merge, count."""
    runbook = RUNBOOK.read_text(encoding="utf-8")
    section = runbook[runbook.index("## Restore the request log") :]
    for statement in (SALVAGE_SQL, DROP_SQL, MERGE_SQL, "falcon-svc-backup restore"):
        assert statement in section, f"the runbook's restore no longer says {statement!r}: update this drill"

    with psycopg.connect(dsn, autocommit=True) as conn:  # the writer role's grants (request_log_grants.sql)
        conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'backup_writer') "
            "THEN CREATE ROLE backup_writer; END IF; END $$"
        )
        conn.execute("GRANT INSERT, SELECT (log_id, received_at) ON request_log TO backup_writer")
    assert backup(pg_bin, dsn, tmp_path, stamp(0)).returncode == 0
    dump = tmp_path / f"falcon-{stamp(0)}.dump"
    in_dump = counts(dsn)
    writer = PostgresWriter(dsn, pool_timeout=5.0)
    writer.open()
    try:
        # Rows written after the dump: only the damaged table has them.
        write(dsn, TODAY, 3, run="after-dump", writer=writer)
        refused = run_script(pg_bin, "restore", str(dump), BACKUP_DATABASE=dsn)
        assert refused.returncode != 0 and "request_log exists" in refused.stderr, refused.stderr

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SALVAGE_SQL)
            conn.execute(DROP_SQL)
        # Meanwhile the workers' writes fail as a database problem, not a bad row, so
        # the request log keeps (spools) their rows rather than rejecting them.
        with pytest.raises(psycopg.errors.UndefinedTable) as raised:
            write(dsn, TODAY, 1, run="while-missing", writer=writer)
        assert not isinstance(raised.value, writer.poison_errors), "rows would be set aside as rejected"

        restored = run_script(pg_bin, "restore", str(dump), BACKUP_DATABASE=dsn)
        assert restored.returncode == 0, restored.stderr
        assert counts(dsn) == in_dump, "the restore did not bring back each partition's rows"
        with psycopg.connect(dsn) as conn:
            grants = conn.execute(
                "SELECT has_table_privilege('backup_writer', 'request_log', 'INSERT'), "
                "has_column_privilege('backup_writer', 'request_log', 'log_id', 'SELECT'), "
                "has_column_privilege('backup_writer', 'request_log', 'text', 'SELECT')"
            ).fetchone()
        assert grants == (True, True, False), f"the writer's grants were not restored as they were: {grants}"
        for table, rows in in_dump.items():
            assert f"{table}\t{rows}\t{rows}" in restored.stdout, f"{table} missing from the check: {restored.stdout}"

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(MERGE_SQL)
            conn.execute("DROP TABLE request_log_salvage")
        after = counts(dsn)
        assert after[partition_name(TODAY)] == in_dump[partition_name(TODAY)] + 3, "the rows since the dump are back"
        assert sum(after.values()) == sum(ROWS_PER_DAY.values()) + 3

        # The same pooled connection writes again once the table is back (the spool's replay).
        write(dsn, TODAY, 1, run="while-missing", writer=writer)
    finally:
        writer.close()
    assert sum(counts(dsn).values()) == sum(ROWS_PER_DAY.values()) + 4
