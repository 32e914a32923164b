"""The PostgreSQL privileges the Ansible roles grant are exactly enough, against a real PostgreSQL.

The grants come from the roles themselves: the psql command lines of their tasks and the
SQL files those tasks feed it (ansible/roles/postgresql/files/database_grants.sql and
ansible/roles/falcon_svc/files/request_log_grants.sql), with the roles' default role and
database names. Then the migrations run as the owner role and the real request-log writer
as the writer role, and everything else is refused: a role with no grant cannot connect,
the writer cannot read what it wrote, change it or create tables.

The cluster trusts every login (tests/servers.py): this checks privileges, not passwords;
the end-to-end run checks scram-sha-256 logins.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from servers import PostgresServer
from test_request_log_postgres import make_log, make_row, wait_until
from tools import require_tool

from falcon_svc.requestlog import PostgresWriter, Spool
from falcon_svc.requestlog.migrate import apply_migrations
from falcon_svc.requestlog.rows import row_record

pytestmark = pytest.mark.integration

ROLES_DIR = Path(__file__).resolve().parents[2] / "ansible" / "roles"
POSTGRESQL_DEFAULTS = yaml.safe_load((ROLES_DIR / "postgresql" / "defaults" / "main.yml").read_text())
FALCON_DEFAULTS = yaml.safe_load((ROLES_DIR / "falcon_svc" / "defaults" / "main.yml").read_text())
DATABASE = POSTGRESQL_DEFAULTS["postgresql_database"]
OWNER = POSTGRESQL_DEFAULTS["postgresql_owner_role"]
WRITER = POSTGRESQL_DEFAULTS["postgresql_writer_role"]
STRANGER = "someone_else"  # a login role the roles grant nothing
# What the falcon_svc role granted before the writer lost SELECT: an upgraded host has it.
OLD_WRITER_GRANT = f"GRANT SELECT, INSERT ON request_log TO {WRITER}"


def _task(role: str, name_start: str) -> dict[str, Any]:
    tasks = yaml.safe_load((ROLES_DIR / role / "tasks" / "configure.yml").read_text())
    (task,) = [task for task in tasks if task["name"].startswith(name_start)]
    return task


def _render(text: str, variables: dict[str, Any]) -> str:
    """Fill in ``{{ name }}`` from ``variables``; anything else in braces is a mistake here."""
    return re.sub(r"{{\s*(\w+)\s*}}", lambda match: str(variables[match[1]]), text)


@dataclass
class RoleSql:
    """A psql task of a role: its arguments (names filled in) and the SQL file it sends on stdin."""

    argv: list[str]
    sql: str

    @classmethod
    def of(cls, role: str, name_start: str, variables: dict[str, Any]) -> RoleSql:
        task = _task(role, name_start)
        args = task["ansible.builtin.command"]
        assert args["argv"][0] == "psql", f"{role}: {name_start!r} is no longer a psql task"
        (sql_file,) = re.findall(r"lookup\('ansible.builtin.file', '([^']+)'\)", args["stdin"])
        sql = (ROLES_DIR / role / "files" / sql_file).read_text()
        return cls([_render(arg, variables) for arg in args["argv"][1:]], sql)

    def run(self, server: PostgresServer, database: str) -> str:
        """Run it as the postgres superuser, as the role does (become_user postgres); return stderr."""
        psql = require_tool("psql", "postgresql-client", ("/usr/lib/postgresql/*/bin",))
        argv = [arg for arg in self.argv if not arg.startswith("--dbname=")]
        connection = ["--host=127.0.0.1", f"--port={server.port}", "--username=postgres", f"--dbname={database}"]
        result = subprocess.run(
            [psql, *argv, *connection], input=self.sql, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"psql failed: {result.stderr}"
        return result.stderr


DATABASE_GRANTS = RoleSql.of(
    "postgresql",
    "Grant the writer role",
    {"postgresql_database": DATABASE, "postgresql_owner_role": OWNER, "postgresql_writer_role": WRITER},
)
TABLE_GRANTS = RoleSql.of(
    "falcon_svc",
    "Let the writer role append to request_log",
    {"falcon_svc_db_name": DATABASE, "falcon_svc_db_writer_role": WRITER},
)


@dataclass
class Deployed:
    """A database set up as the roles do it, and what each grant step printed."""

    server: PostgresServer
    database: str
    database_grants: list[str]  # stderr of two runs
    table_grants: list[str]  # stderr of two runs, on a host upgraded from the old grant
    migrated: list[str]

    def dsn(self, role: str) -> str:
        return f"postgresql://{role}@127.0.0.1:{self.server.port}/{self.database}"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """The postgresql role, then the falcon_svc role's migrations and table grants, in their order."""
    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    server.init()
    # NOTE: one database of the default name per module; names are the roles' defaults.
    database = f"{DATABASE}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            for role in (OWNER, WRITER, STRANGER):
                conn.execute(f'CREATE ROLE "{role}" LOGIN')
            conn.execute(f'CREATE DATABASE "{database}" OWNER "{OWNER}" ENCODING \'UTF8\' TEMPLATE template0')
        database_sql = RoleSql(
            [arg.replace(f"--set=database={DATABASE}", f"--set=database={database}") for arg in DATABASE_GRANTS.argv],
            DATABASE_GRANTS.sql,
        )
        database_grants = [database_sql.run(server, database) for _ in range(2)]
        owner_dsn = f"postgresql://{OWNER}@127.0.0.1:{server.port}/{database}"
        migrated = apply_migrations(owner_dsn)
        with psycopg.connect(owner_dsn, autocommit=True) as conn:
            conn.execute(OLD_WRITER_GRANT)
        table_grants = [TABLE_GRANTS.run(server, database) for _ in range(2)]
        yield Deployed(server, database, database_grants, table_grants, migrated)
    finally:
        server.destroy()


def test_the_grant_steps_change_things_once_and_then_nothing(deployed: Deployed) -> None:
    first, second = deployed.database_grants
    assert "revoked CONNECT, TEMPORARY on the database from PUBLIC" in first, first
    assert "granted CONNECT, TEMPORARY on the database to the writer" in first, first
    assert "ansible-changed" not in second, f"a second run must change nothing (idempotent): {second}"
    first, second = deployed.table_grants
    assert "revoked SELECT on request_log" in first and "granted SELECT (log_id)" in first, first
    assert "granted SELECT (received_at)" in first, first
    assert "ansible-changed" not in second, f"a second run must change nothing (idempotent): {second}"


def test_the_owner_role_runs_the_migrations(deployed: Deployed) -> None:
    assert deployed.migrated == ["0001", "0002"], "the owner applied the migrations"
    assert apply_migrations(deployed.dsn(OWNER)) == [], "and a second run, as the owner, applies nothing"


def test_the_real_request_log_writes_as_the_writer_role(deployed: Deployed, tmp_path: Path) -> None:
    """COPY into its temporary table, INSERT ... ON CONFLICT (log_id, received_at) DO NOTHING, the SELECT 1 probe."""
    spool = Spool(tmp_path / "spool", max_bytes=10**7)
    log = make_log(deployed.dsn(WRITER), spool)
    rows = [make_row(i, "grants") for i in range(120)]
    log.start()
    try:
        for row in rows:
            log.submit(row)
        wait_until(lambda: _stored(deployed, "grants") == 120, 20, "the writer role's rows are in request_log")
        assert log.status()["postgres"] == "up", log.status()
    finally:
        log.close(timeout=5)
    assert list(spool.directory.glob("*")) == [], "nothing was spooled: every write was allowed"

    writer = PostgresWriter(deployed.dsn(WRITER), pool_timeout=5.0)
    writer.open()
    try:
        writer.probe()
        # A retried batch: the rows conflict on the key and are skipped, which needs SELECT (log_id, received_at).
        writer.write([row_record(row) for row in rows[:10]], operation="write_batch")
    finally:
        writer.close()
    assert _stored(deployed, "grants") == 120, "a retried batch is stored once"


@pytest.mark.parametrize("column", ["log_id", "received_at"])
def test_the_writer_needs_select_on_each_conflict_target_column(deployed: Deployed, column: str) -> None:
    """Why the writer has SELECT (log_id, received_at): without either PostgreSQL refuses the ON CONFLICT.

    If this stops failing (the writer dropped the conflict target, or PostgreSQL stopped
    asking), request_log_grants.sql can grant INSERT alone.
    """
    owner = psycopg.connect(deployed.dsn(OWNER), autocommit=True)
    writer = PostgresWriter(deployed.dsn(WRITER), pool_timeout=5.0)
    try:
        owner.execute(f"REVOKE SELECT ({column}) ON request_log FROM {WRITER}")
        writer.open()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="request_log"):
            writer.write([row_record(make_row(1, "insert-only"))], operation="write_batch")
    finally:
        writer.close()
        owner.close()
        restored = TABLE_GRANTS.run(deployed.server, deployed.database)
    assert f"granted SELECT ({column})" in restored, f"the role's grants put it back: {restored}"


def test_the_writer_writes_into_partitions_the_retention_job_created(deployed: Deployed) -> None:
    """A partition created after the grants ran (by the owner, as the timer does) takes the writer's rows."""
    from datetime import UTC, date, datetime, timedelta

    from falcon_svc.requestlog import retention

    far = date.today() + timedelta(days=100)
    with psycopg.connect(deployed.dsn(OWNER), autocommit=True) as conn:
        retention.maintain(conn, today=far, retention_days=None, days_ahead=0)
    row = make_row(1, "new-partition")
    row.received_at = datetime(far.year, far.month, far.day, 12, tzinfo=UTC).timestamp()
    writer = PostgresWriter(deployed.dsn(WRITER), pool_timeout=5.0)
    writer.open()
    try:
        writer.write([row_record(row)] * 2, operation="write_batch")
    finally:
        writer.close()
    with psycopg.connect(deployed.dsn(OWNER)) as conn:
        stored = conn.execute("SELECT tableoid::regclass::text FROM request_log WHERE log_id = %s", (row.log_id,))
        assert stored.fetchall() == [(retention.partition_name(far),)], "stored once, in the new partition"


def test_the_writer_cannot_drop_or_create_partitions(deployed: Deployed) -> None:
    """Only the owner (the retention unit) manages partitions: the internet-facing writer cannot."""
    with psycopg.connect(deployed.dsn(OWNER)) as conn:
        (name,) = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'request_log'::regclass AND c.relname <> 'request_log_default' LIMIT 1"
        ).fetchone() or ("",)
    for statement in (
        f"DROP TABLE {name}",
        "DELETE FROM request_log_default",
        "ALTER TABLE request_log DETACH PARTITION request_log_default",
    ):
        with (
            psycopg.connect(deployed.dsn(WRITER), autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT text FROM request_log",
        "SELECT request_id, route, label FROM request_log",
        "SELECT text_hmac, client_key_id FROM request_log",
        "UPDATE request_log SET label = 'x'",
        "DELETE FROM request_log",
        "TRUNCATE request_log",
        "SELECT version FROM schema_migrations",
        "CREATE TABLE public.intruder (x int)",
    ],
)
def test_the_writer_cannot_read_change_or_create(deployed: Deployed, statement: str) -> None:
    with (
        psycopg.connect(deployed.dsn(WRITER), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement)


def test_a_role_without_grants_cannot_connect(deployed: Deployed) -> None:
    """PUBLIC lost CONNECT and TEMPORARY: another login role on the cluster sees nothing of this database."""
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(deployed.dsn(STRANGER), connect_timeout=5)
    with psycopg.connect(deployed.server.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT has_database_privilege('public', %s, 'CONNECT'), has_database_privilege('public', %s, 'TEMPORARY')",
            (deployed.database, deployed.database),
        ).fetchone()
    assert row == (False, False), "PUBLIC still has CONNECT or TEMPORARY on the database"


def _stored(deployed: Deployed, run: str) -> int:
    with psycopg.connect(deployed.dsn(OWNER), connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM request_log WHERE request_id LIKE %s", (f"{run}-%",)).fetchone()
    assert row is not None
    return row[0]
