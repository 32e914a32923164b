"""Keep request_log bounded: create its daily partitions ahead, drop the expired ones.

``request_log`` is partitioned by day (migration 0002): ``request_log_YYYYMMDD`` holds
the rows received that UTC day, ``request_log_default`` any row whose day had no
partition yet. One run of ``falcon-svc retention`` (daily, falcon-svc-retention.timer):

1. drops every day partition wholly older than REQUEST_LOG_RETENTION_DAYS (day D goes
   once D + 1 <= today - retention, so at least ``retention`` full days are kept),
   logging one line per partition, and deletes the default partition's expired rows;
2. moves the rows still in the default partition into their days' partitions
   (created for them), so no row is lost or kept past its time;
3. creates the partitions of today and the next ``DAYS_AHEAD`` days.

Failure semantics: each partition is created or dropped in its own transaction, so a
failed run leaves every partition either done or untouched, and the next run picks up
where it stopped. Locks are waited for at most ``LOCK_TIMEOUT``: a DROP queued behind a
long query would otherwise block every insert behind it. Runs are serialised with each
other and with ``falcon-svc migrate`` by the migrations' advisory lock.

Privilege: creating and dropping partitions needs the table's owner. The timer's unit
connects as the owner through a passfile handed to it by systemd (LoadCredential=), as
the migration does; the writer role the workers use never can drop anything
(docs/SECURITY.md, "Request log retention and keyed digests").
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

TABLE = "request_log"
DEFAULT_PARTITION = "request_log_default"
# Partitions exist this many days past today: a week without a successful run
# (a stopped timer, a broken deploy) still never sends a row to the default partition.
DAYS_AHEAD = 7
LOCK_TIMEOUT = "5s"
_PARTITION_NAME = re.compile(r"^request_log_(?P<day>\d{8})$")
_CONNECT_TIMEOUT_SECONDS = 10


class RetentionError(RuntimeError):
    """request_log is not the partitioned table this module maintains."""


@dataclass(frozen=True, slots=True)
class Partition:
    """One day partition: its table name and the UTC day it holds."""

    name: str
    day: date

    @classmethod
    def of(cls, day: date) -> Partition:
        return cls(partition_name(day), day)

    @property
    def bounds(self) -> tuple[datetime, datetime]:
        """Return [start, end) of the day, in UTC."""
        start = datetime.combine(self.day, time(), tzinfo=UTC)
        return start, start + timedelta(days=1)

    def describe(self) -> str:
        start, end = self.bounds
        return f"{self.name} [{start:%Y-%m-%d %H:%M}Z, {end:%Y-%m-%d %H:%M}Z)"


@dataclass
class Report:
    """What one run did (or, with ``dry_run``, would do)."""

    cutoff: date
    dropped: list[Partition] = field(default_factory=list)
    created: list[Partition] = field(default_factory=list)
    kept: int = 0
    default_rows_expired: int = 0
    default_rows_moved: int = 0

    def summary(self) -> str:
        return (
            f"retention: keeping rows from {self.cutoff:%Y-%m-%d} on; dropped {len(self.dropped)} partition(s), "
            f"kept {self.kept}, created {len(self.created)}; default partition: "
            f"{self.default_rows_expired} expired row(s) deleted, {self.default_rows_moved} moved to their day"
        )


def partition_name(day: date) -> str:
    """Return the name of ``day``'s partition: ``request_log_YYYYMMDD``."""
    return f"{TABLE}_{day:%Y%m%d}"


def cutoff_day(today: date, retention_days: int) -> date:
    """Return the first day kept: partitions of earlier days hold only expired rows."""
    return today - timedelta(days=retention_days)


def day_partitions(conn: psycopg.Connection) -> list[Partition]:
    """Return request_log's day partitions, oldest first (the default partition is not one).

    Raises:
        RetentionError: request_log is missing or not partitioned (migration 0002 not applied).
    """
    row = conn.execute("SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)", (TABLE,)).fetchone()
    if row is None or row[0] != "p":
        raise RetentionError(f"{TABLE} is not a partitioned table: run `falcon-svc migrate` first")
    names = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
        (TABLE,),
    ).fetchall()
    found = []
    for (name,) in names:
        match = _PARTITION_NAME.match(name)
        if match is not None:
            found.append(Partition(name, datetime.strptime(match["day"], "%Y%m%d").date()))
    return sorted(found, key=lambda partition: partition.day)


def maintain(
    conn: psycopg.Connection,
    *,
    today: date,
    retention_days: int | None,
    days_ahead: int = DAYS_AHEAD,
    dry_run: bool = False,
) -> Report:
    """Drop what expired (unless ``retention_days`` is None), rehome default rows, create partitions ahead.

    ``conn`` must be in autocommit mode: each step is its own transaction. The caller
    holds the advisory lock.
    """
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
    partitions = day_partitions(conn)
    cutoff = cutoff_day(today, retention_days) if retention_days is not None else date.min
    report = Report(cutoff=cutoff)
    for partition in partitions:
        if partition.day < cutoff:
            _drop(conn, partition, dry_run=dry_run)
            report.dropped.append(partition)
    if retention_days is not None:
        report.default_rows_expired = _expire_default_rows(conn, cutoff, dry_run=dry_run)
    existing = {partition.day for partition in partitions if partition.day >= cutoff}
    report.kept = len(existing)
    stray_days = _default_row_days(conn, cutoff)
    wanted = sorted({today + timedelta(days=offset) for offset in range(days_ahead + 1)} | set(stray_days))
    for day in wanted:
        if day in existing:
            continue
        partition = Partition.of(day)
        moved = stray_days.get(day, 0)
        if not dry_run:
            moved = _create(conn, partition)
        report.created.append(partition)
        report.default_rows_moved += moved
        logger.info(
            "%s partition %s%s",
            "would create" if dry_run else "created",
            partition.describe(),
            f", {moved} row(s) from {DEFAULT_PARTITION}" if moved else "",
        )
    return report


def run(dsn: str, *, today: date, retention_days: int, dry_run: bool = False) -> Report:
    """Connect to ``dsn`` (the table owner), take the migrations' lock and ``maintain``.

    Raises:
        RetentionError: request_log is not partitioned.
        psycopg.Error: PostgreSQL is unreachable or refused a step (a lock timeout, a privilege).
    """
    from falcon_svc.requestlog.migrate import ADVISORY_LOCK_KEY

    with psycopg.connect(
        dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_SECONDS, application_name="falcon-svc retention"
    ) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            report = maintain(conn, today=today, retention_days=retention_days, dry_run=dry_run)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    logger.info(("dry run: " if dry_run else "") + report.summary())
    return report


def command(args: argparse.Namespace) -> int:
    """``falcon-svc retention [--dry-run]``: exit 0 when done, 1 with one clear line when not."""
    from falcon_svc.redact import redact
    from falcon_svc.startup import load_settings_or_exit

    settings = load_settings_or_exit()
    today = datetime.now(UTC).date()
    try:
        report: Report | None = run(
            settings.database_url,
            today=today,
            retention_days=settings.request_log_retention_days,
            dry_run=args.dry_run,
        )
    except (psycopg.Error, RetentionError) as ex:
        reason = redact(str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__)
        print(f"retention: FAILED ({reason}); the steps before it are done, the next run retries", file=sys.stderr)
        return 1
    # NOTE: run() logged one line per change and the summary (stdout, the journal).
    return 0 if report is not None else 1


def _drop(conn: psycopg.Connection, partition: Partition, *, dry_run: bool) -> None:
    logger.info("%s partition %s", "would drop" if dry_run else "dropped", partition.describe())
    if not dry_run:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition.name)))


def _expire_default_rows(conn: psycopg.Connection, cutoff: date, *, dry_run: bool) -> int:
    """Delete (or count) the default partition's rows received before ``cutoff``."""
    start = datetime.combine(cutoff, time(), tzinfo=UTC)
    if dry_run:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE received_at < %s").format(sql.Identifier(DEFAULT_PARTITION)),
            (start,),
        ).fetchone()
        count = int(row[0]) if row else 0
    else:
        count = conn.execute(
            sql.SQL("DELETE FROM {} WHERE received_at < %s").format(sql.Identifier(DEFAULT_PARTITION)), (start,)
        ).rowcount
    if count:
        logger.info("%s %d expired row(s) from %s", "would delete" if dry_run else "deleted", count, DEFAULT_PARTITION)
    return count


def _default_row_days(conn: psycopg.Connection, cutoff: date) -> dict[date, int]:
    """Return the UTC days (on or after ``cutoff``) of the rows in the default partition, with counts."""
    rows = conn.execute(
        sql.SQL(
            "SELECT (received_at AT TIME ZONE 'UTC')::date AS day, count(*) FROM {} "
            "WHERE received_at >= %s GROUP BY day"
        ).format(sql.Identifier(DEFAULT_PARTITION)),
        (datetime.combine(cutoff, time(), tzinfo=UTC),),
    ).fetchall()
    return {day: int(count) for day, count in rows}


def _create(conn: psycopg.Connection, partition: Partition) -> int:
    """Create ``partition``, moving its day's rows out of the default partition; return how many moved.

    NOTE: CREATE TABLE ... PARTITION OF refuses a day the default partition holds
    rows of. So the table is created detached, filled from the default partition and
    attached, in one transaction under an exclusive lock on the default partition
    (inserts of other days, routed to their own partitions, do not wait).
    """
    start, end = partition.bounds
    name, default = sql.Identifier(partition.name), sql.Identifier(DEFAULT_PARTITION)
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(default))
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(name, sql.Identifier(TABLE)))
        moved = conn.execute(
            sql.SQL(
                "WITH moved AS (DELETE FROM {} WHERE received_at >= %s AND received_at < %s RETURNING *) "
                "INSERT INTO {} SELECT * FROM moved"
            ).format(default, name),
            (start, end),
        ).rowcount
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(TABLE), name, sql.Literal(start), sql.Literal(end)
            )
        )
    return moved
