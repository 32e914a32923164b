"""Write request-log rows to PostgreSQL: the connection pool, the SQL, and which errors are worth retrying.

A write is one transaction: COPY into a temporary staging table, then
``INSERT ... SELECT ... ON CONFLICT (log_id, received_at) DO NOTHING``, so a row
written twice (a retried batch, a replayed spool file) is stored once: the
conflict target is request_log's primary key, which must hold the partition key
(received_at, migration 0002), and a row carries both values unchanged into
every retry and the spool. A write is one attempt:
whether to retry, spool or stop trying is the queue's business (``RequestLog``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from falcon_svc import metrics
from falcon_svc.requestlog.rows import COLUMNS
from falcon_svc.requestlog.spool_batches import SpooledBatch

logger = logging.getLogger(__name__)

DEPENDENCY = "postgres"

_COLUMN_LIST = ", ".join(COLUMNS)
# NOTE: one temporary table per connection, created when the pool opens it;
# ON COMMIT DELETE ROWS empties it after every batch without catalog churn.
_STAGING_DDL = """
CREATE TEMPORARY TABLE request_log_staging (
    log_id text, request_id text, received_at double precision, route text, method text, status smallint,
    worker_id text, model_version text, label text, confidence double precision, n_texts integer,
    cache_hit boolean, idempotent_replay boolean, latency_ms double precision, text_length integer,
    text_hmac text, text text, client_key_id text
) ON COMMIT DELETE ROWS
"""
_COPY = f"COPY request_log_staging ({_COLUMN_LIST}) FROM STDIN"
_MOVE = (
    f"INSERT INTO request_log ({_COLUMN_LIST}) "
    f"SELECT {_COLUMN_LIST.replace('received_at', 'to_timestamp(received_at)')} FROM request_log_staging "
    "ON CONFLICT (log_id, received_at) DO NOTHING"
)
# NOTE: spooled rows are replayed as the JSON lines they are on disk: COPY into a
# json column, then PostgreSQL parses them (json_populate_record, into the staging
# table's row type, so both paths convert values alike). That is about twice as
# fast as decoding them in Python, and leaves the GIL to the request threads.
_SPOOLED_DDL = "CREATE TEMPORARY TABLE request_log_spooled (line json) ON COMMIT DELETE ROWS"
_COPY_SPOOLED = "COPY request_log_spooled (line) FROM STDIN"
_MOVE_SPOOLED = (
    f"INSERT INTO request_log ({_COLUMN_LIST}) "
    f"SELECT {', '.join('to_timestamp(r.received_at)' if name == 'received_at' else 'r.' + name for name in COLUMNS)} "
    "FROM request_log_spooled, json_populate_record(NULL::request_log_staging, line) AS r "
    "ON CONFLICT (log_id, received_at) DO NOTHING"
)

# NOTE: psycopg maps connection failures, admin shutdown (57P01), query
# cancellation / statement timeout (57014), serialization failures and
# psycopg_pool.PoolTimeout all to OperationalError subclasses.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    TimeoutError,
    ConnectionError,
)
# NOTE: errors caused by a row's content (bad value, NOT NULL); anything else
# (missing table, no privilege) is about the database and must keep the rows.
POISON_ERRORS: tuple[type[BaseException], ...] = (psycopg.DataError, psycopg.IntegrityError)


def is_transient(ex: BaseException) -> bool:
    """Tell whether retrying might help: lost or refused connections, timeouts, shutdowns, pool timeouts."""
    return isinstance(ex, TRANSIENT_ERRORS)


@dataclass
class PostgresWriter:
    """Write batches of request-log records to PostgreSQL through a small pool of its own.

    Timeouts are in seconds: ``connect_timeout`` for one connection attempt,
    ``pool_timeout`` for a free connection, ``reconnect_timeout`` before the pool
    starts a new reconnection attempt, ``statement_timeout`` for one statement.
    """

    transient_errors = TRANSIENT_ERRORS
    poison_errors = POISON_ERRORS

    dsn: str = field(repr=False)  # NOTE: may hold a password
    _: KW_ONLY
    connect_timeout: int = 2
    pool_timeout: float = 2.0
    reconnect_timeout: float = 10.0
    statement_timeout: float = 30.0
    _pool: ConnectionPool | None = field(default=None, init=False, repr=False)

    def open(self) -> None:
        """Open the connection pool without waiting for PostgreSQL (it connects in the background)."""
        if self._pool is not None:
            return
        self._pool = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=2,  # NOTE: one for the writer, one for the replayer
            open=False,
            name="request-log",
            timeout=self.pool_timeout,
            # NOTE: the pool gives up a reconnection attempt after this long, and the
            # next getconn starts a new one: it never stops trying, and a connection
            # is back within about reconnect_timeout of PostgreSQL returning.
            reconnect_timeout=self.reconnect_timeout,
            reconnect_failed=lambda _pool: logger.warning("request-log: PostgreSQL still unreachable, retrying"),
            check=ConnectionPool.check_connection,
            configure=_configure,
            num_workers=1,
            kwargs={
                "connect_timeout": self.connect_timeout,
                "application_name": "falcon-svc request log",
                "options": f"-c statement_timeout={int(self.statement_timeout * 1000)}",
            },
        )
        self._pool.open(wait=False)

    def write(self, records: Sequence[Mapping[str, Any]], *, operation: str, wait: float | None = None) -> None:
        """Write ``records`` in one transaction; each attempt is timed as a ``postgres`` ``operation`` call.

        ``wait`` shortens the wait for a free connection below the pool's timeout
        (as the shutdown deadline nears).
        """
        pool = self._opened_pool()
        timeout = self.pool_timeout if wait is None else min(self.pool_timeout, wait)
        if isinstance(records, SpooledBatch) and not records.decoded:
            try:
                self._write_spooled(pool, records, operation=operation, timeout=timeout)
                return
            except POISON_ERRORS as ex:
                # NOTE: a line PostgreSQL cannot take as it is (unreadable, a NUL or a lone
                # surrogate that _clean would fix): decode the batch and write it as rows.
                logger.info("request-log: replaying %s as decoded rows (%s)", records.describe(), ex)
        values = [_copy_values(record) for record in records]
        started = time.perf_counter()
        try:
            with pool.connection(timeout=timeout) as conn, conn.cursor() as cur:
                with cur.copy(_COPY) as copy:
                    for value in values:
                        copy.write_row(value)
                cur.execute(_MOVE)
        finally:
            metrics.DEPENDENCY_LATENCY.labels(DEPENDENCY, operation).observe(time.perf_counter() - started)

    def _write_spooled(self, pool: ConnectionPool, batch: SpooledBatch, *, operation: str, timeout: float) -> None:
        """Store a batch of spooled JSON lines as they are, in one transaction; PostgreSQL parses them."""
        # NOTE: COPY's text format treats a backslash as an escape; JSON lines hold no
        # tab or newline (json.dumps escapes them), so doubling backslashes is all it takes.
        data = b"".join(batch.lines).replace(b"\\", b"\\\\")
        started = time.perf_counter()
        try:
            with pool.connection(timeout=timeout) as conn, conn.cursor() as cur:
                with cur.copy(_COPY_SPOOLED) as copy:
                    copy.write(data)
                cur.execute(_MOVE_SPOOLED)
        finally:
            metrics.DEPENDENCY_LATENCY.labels(DEPENDENCY, operation).observe(time.perf_counter() - started)

    def probe(self) -> None:
        """Run ``SELECT 1``; raise if PostgreSQL does not answer."""
        with self._opened_pool().connection(timeout=self.pool_timeout) as conn:
            conn.execute("SELECT 1")

    def warm_up(self) -> bool:
        """Have a connection ready (a ``SELECT 1``, waiting as a write would); return whether PostgreSQL answered."""
        try:
            self.probe()
        except TRANSIENT_ERRORS:
            return False
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Close the pool, waiting at most ``timeout`` seconds for its threads (one may be reconnecting).

        NOTE: a connection still in use (a write stuck in PostgreSQL) is not waited
        for: it closes when it is returned, or with the process.
        """
        if self._pool is not None:
            self._pool.close(timeout=timeout)

    def _opened_pool(self) -> ConnectionPool:
        if self._pool is None:
            raise RuntimeError("PostgresWriter.open() was not called")
        return self._pool


def _configure(conn: psycopg.Connection) -> None:
    """Prepare a new pooled connection: create its staging tables."""
    conn.execute(_STAGING_DDL)
    conn.execute(_SPOOLED_DDL)
    conn.commit()


def _copy_values(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """Return one COPY row, with strings PostgreSQL would reject made safe.

    NOTE: a single bad row must not make its whole batch fail forever (and then
    its spool file unreplayable): NUL characters and lone surrogates (both
    possible from JSON input) are replaced.
    """
    return tuple(_clean(record.get(name)) for name in COLUMNS)


def _clean(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value
