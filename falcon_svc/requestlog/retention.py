"""Keep request_log bounded: create its daily partitions ahead, drop the expired ones.

``request_log`` is partitioned by day (migration 0002): ``request_log_YYYYMMDD`` holds
the rows received that UTC day, ``request_log_default`` any row whose day had no
partition yet. One run of ``falcon-svc retention`` (daily, falcon-svc-retention.timer),
in this order, most urgent first:

1. creates the partitions of today, then of the next ``DAYS_AHEAD`` days, moving any
   rows of those days out of the default partition;
2. deletes the default partition's rows older than REQUEST_LOG_RETENTION_DAYS (they
   get no partition) and moves the others into their days' partitions, newest first;
3. drops every day partition wholly older than REQUEST_LOG_RETENTION_DAYS (day D goes
   once D + 1 <= today - retention, so at least ``retention`` full days are kept),
   logging one line per partition.

Failure semantics: each partition is created or dropped in its own transaction, and
locks are waited for at most ``LOCK_TIMEOUT``: a DROP queued behind a long query would
otherwise block every insert behind it. A step that meets a lock held by another
session (a pg_dump, a report with its transaction open) is logged, skipped and named
in the summary; the run carries on with the next step and exits 1, and the next run
retries it. So a lock never stops tomorrow's partition from being created.
What locks cannot be worked around: DROP of a partition needs an ACCESS EXCLUSIVE
lock on request_log itself, so any open transaction that has read request_log holds
up every drop (after the first timeout the other drops are not tried, each would wait
the same lock); creating a partition needs one on the default partition (PostgreSQL
checks it holds no row of the new day), so a session that has read the whole table
(pg_dump) holds up creation until it ends: the partitions made ``DAYS_AHEAD`` days in
advance are what covers that.
NOTE: ``DETACH PARTITION ... CONCURRENTLY`` would not help: PostgreSQL refuses it
while a default partition exists, and it too waits for the reader's transaction.
Runs are serialised with each other and with ``falcon-svc migrate`` by the
migrations' advisory lock.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

import psycopg
import psycopg.errors
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
    # One entry per step given up on (lock timeout and the like): "drop request_log_20261001: <reason>".
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"retention: keeping rows from {self.cutoff:%Y-%m-%d} on; dropped {len(self.dropped)} partition(s), "
            f"kept {self.kept}, created {len(self.created)}; default partition: "
            f"{self.default_rows_expired} expired row(s) deleted, {self.default_rows_moved} moved to their day"
        )
        if self.skipped:
            text += f"; SKIPPED {len(self.skipped)} step(s), retried by the next run: " + "; ".join(self.skipped)
        return text


# Errors that concern one step, not the run: another session's lock, a cancelled
# statement, a deadlock. A lost connection or a missing privilege still stops the run.
_SKIPPABLE = (
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.ObjectInUse,
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
    drop_expired: bool = True,
) -> Report:
    """Create partitions ahead, rehome default rows, then drop what expired; skip what is locked.

    ``retention_days=None`` keeps every row (nothing is expired); ``drop_expired=False``
    (``falcon-svc migrate``) drops no partition but still gives expired default rows
    no partition. Steps given up on are in ``Report.skipped``.

    ``conn`` must be in autocommit mode: each step is its own transaction. The caller
    holds the advisory lock.
    """
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
    partitions = day_partitions(conn)
    cutoff = cutoff_day(today, retention_days) if retention_days is not None else date.min
    report = Report(cutoff=cutoff)
    existing = {partition.day for partition in partitions}
    report.kept = sum(1 for partition in partitions if partition.day >= cutoff)
    stray_days = _default_row_days(conn, cutoff)
    # NOTE: today first: until its partition exists, today's inserts go to the default partition.
    ahead = [today + timedelta(days=offset) for offset in range(days_ahead + 1)]
    for day in ahead:
        if day not in existing:
            _attempt(report, f"create {partition_name(day)}", _create_step, conn, report, day, stray_days, dry_run)
    if retention_days is not None:
        _attempt(report, f"expire rows of {DEFAULT_PARTITION}", _expire_step, conn, report, cutoff, dry_run)
    for day in sorted(set(stray_days) - set(ahead) - existing, reverse=True):
        _attempt(report, f"create {partition_name(day)}", _create_step, conn, report, day, stray_days, dry_run)
    if drop_expired:
        expired = [partition for partition in partitions if partition.day < cutoff]
        for index, partition in enumerate(expired):
            if not _attempt(report, f"drop {partition.name}", _drop_step, conn, report, partition, dry_run):
                # NOTE: DROP of a partition locks request_log itself, so the other drops
                # would each wait LOCK_TIMEOUT for the same lock: not tried this run.
                report.skipped.extend(f"drop {later.name}: not tried after that" for later in expired[index + 1 :])
                break
    return report


def _attempt(report: Report, step: str, action: Callable[..., None], *args: object) -> bool:
    """Run one step; on another session's lock (and the like) log it, note it and return False."""
    try:
        action(*args)
    except _SKIPPABLE as ex:
        reason = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        logger.warning("skipped %s: %s (%s); the next run retries", step, reason, type(ex).__name__)
        report.skipped.append(f"{step}: {reason}")
        return False
    return True


def _create_step(
    conn: psycopg.Connection, report: Report, day: date, stray_days: dict[date, int], dry_run: bool
) -> None:
    partition = Partition.of(day)
    moved = stray_days.get(day, 0) if dry_run else _create(conn, partition)
    report.created.append(partition)
    report.default_rows_moved += moved
    logger.info(
        "%s partition %s%s",
        "would create" if dry_run else "created",
        partition.describe(),
        f", {moved} row(s) from {DEFAULT_PARTITION}" if moved else "",
    )


def _expire_step(conn: psycopg.Connection, report: Report, cutoff: date, dry_run: bool) -> None:
    report.default_rows_expired = _expire_default_rows(conn, cutoff, dry_run=dry_run)


def _drop_step(conn: psycopg.Connection, report: Report, partition: Partition, dry_run: bool) -> None:
    _drop(conn, partition, dry_run=dry_run)
    report.dropped.append(partition)


def run(dsn: str, *, today: date, retention_days: int, dry_run: bool = False) -> Report:
    """Connect to ``dsn`` (the table owner), take the migrations' lock and ``maintain``.

    Raises:
        RetentionError: request_log is not partitioned.
        psycopg.Error: PostgreSQL is unreachable or refused the run (a privilege); a step
            held up by another session's lock is in ``Report.skipped`` instead.
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
    log = logger.warning if report.skipped else logger.info
    log(("dry run: " if dry_run else "") + report.summary())
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
    if report is None:
        return 1
    if report.skipped:
        print(
            f"retention: INCOMPLETE, skipped {len(report.skipped)} step(s) (the next run retries): "
            + "; ".join(report.skipped),
            file=sys.stderr,
        )
        return 1
    return 0


def _drop(conn: psycopg.Connection, partition: Partition, *, dry_run: bool) -> None:
    if not dry_run:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition.name)))
    # NOTE: said after the DROP, so a skipped drop is never logged as done.
    logger.info("%s partition %s", "would drop" if dry_run else "dropped", partition.describe())


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
