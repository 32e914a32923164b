"""Apply the versioned SQL migrations in ``falcon_svc/requestlog/migrations/`` to PostgreSQL.

Each file ``NNNN_name.sql`` is one version, applied once, in version order, in its
own transaction together with its row in ``schema_migrations``: a failed
migration leaves neither half-applied DDL nor a record claiming it ran.
A session-level advisory lock serialises concurrent runs (two hosts deploying at
once, ``falcon-svc migrate`` racing a worker), so running it twice, or twice at
the same time, is safe.

After the migrations, request_log's daily partitions for today and the days ahead
are created, today's first (``retention.maintain``, without dropping anything:
dropping is the retention timer's job), so a fresh install never writes into the
default partition.

Retention: migration 0002 copies the rows of the old table. Rows older than
REQUEST_LOG_RETENTION_DAYS are not copied (the next retention run would drop them
anyway, after their days had been given partitions and the copy had written them
twice): ``apply_migrations`` passes the first day kept to the SQL as the session
setting ``falcon.request_log_keep_from``. Unset (the file run by hand), every row is
copied. The retention is read from the settings, as ``falcon-svc retention`` does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources

import psycopg

logger = logging.getLogger(__name__)

# NOTE: one fixed key for every falcon-svc database; pg_advisory_lock takes a bigint.
ADVISORY_LOCK_KEY = 0x66616C636F6E  # "falcon"
# Read by 0002: request_log rows received before it (an ISO timestamp) are not copied.
KEEP_FROM_SETTING = "falcon.request_log_keep_from"
_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_CONNECT_TIMEOUT_SECONDS = 10


class MigrationError(RuntimeError):
    """The migrations directory is inconsistent or a migration failed."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: its version (``"0001"``), name and statements."""

    version: str
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Return the packaged migrations in version order.

    Raises:
        MigrationError: two files share a version, or a ``.sql`` file is misnamed.
    """
    directory = resources.files("falcon_svc.requestlog.migrations")
    found: dict[str, Migration] = {}
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = match["version"]
        if version in found:
            raise MigrationError(f"migration version {version} appears twice ({found[version].name}, {match['name']})")
        found[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


def apply_migrations(dsn: str, *, today: date | None = None, retention_days: int | None = None) -> list[str]:
    """Apply every migration not yet recorded in ``schema_migrations``; return their versions.

    Then create the request_log partitions of ``today`` (default: the UTC date) and the
    days ahead, moving any rows of those days out of the default partition. Rows older
    than ``retention_days`` (default: REQUEST_LOG_RETENTION_DAYS from the settings) get
    no partition: 0002 does not copy them, and any left in the default partition are
    deleted.

    Raises:
        MigrationError: a migration failed (its transaction was rolled back), the
            settings are invalid, or a partition could not be created.
        psycopg.OperationalError: PostgreSQL cannot be reached.
    """
    migrations = load_migrations()
    applied_now: list[str] = []
    today = today or datetime.now(UTC).date()
    if retention_days is None:
        retention_days = _retention_days_from_settings()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_SECONDS) as conn:
        # NOTE: taken before reading schema_migrations, so a concurrent run waits
        # here and then sees what the first one applied.
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            keep_from = datetime.combine(today - timedelta(days=retention_days), time(), tzinfo=UTC)
            conn.execute("SELECT set_config(%s, %s, false)", (KEEP_FROM_SETTING, keep_from.isoformat()))
            for migration in migrations:
                if migration.version in done:
                    continue
                _apply_one(conn, migration)
                applied_now.append(migration.version)
            _create_partitions_ahead(conn, today, retention_days)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    return applied_now


def _retention_days_from_settings() -> int:
    from falcon_svc.settings import Settings, SettingsError

    try:
        return Settings.from_env().request_log_retention_days
    except SettingsError as ex:
        raise MigrationError(f"cannot read REQUEST_LOG_RETENTION_DAYS: {ex}") from ex


def _create_partitions_ahead(conn: psycopg.Connection, today: date, retention_days: int) -> None:
    """Create the day partitions ahead, today's first; drop nothing (the retention timer does)."""
    from falcon_svc.requestlog import retention

    try:
        report = retention.maintain(conn, today=today, retention_days=retention_days, drop_expired=False)
    except psycopg.OperationalError:
        raise
    except (psycopg.Error, retention.RetentionError) as ex:
        raise MigrationError(f"creating the request_log partitions failed: {ex}") from ex
    if report.skipped:
        raise MigrationError(
            "the migrations are applied but some request_log partitions are not (another session holds a lock; "
            "run `falcon-svc migrate` again): " + "; ".join(report.skipped)
        )


def _apply_one(conn: psycopg.Connection, migration: Migration) -> None:
    """Run one migration and record it, atomically."""
    try:
        with conn.transaction():
            # NOTE: no parameters, so psycopg uses the simple query protocol and a
            # file may hold several statements.
            conn.execute(migration.sql.encode("utf-8"))
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
    except psycopg.OperationalError:
        raise
    except psycopg.Error as ex:
        raise MigrationError(f"migration {migration.version}_{migration.name} failed: {ex}") from ex
    logger.info("applied migration %s_%s", migration.version, migration.name)
