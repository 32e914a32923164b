"""Log every answered request to PostgreSQL without ever slowing or failing a request.

The request path only puts a ``LogRow`` into a bounded in-memory queue
(``submit``: microseconds, never blocks, never raises); when the queue is full
the row goes to the on-disk spool instead. A writer thread takes batches off the
queue and writes each in one transaction: COPY into a temporary staging table,
then ``INSERT ... SELECT ... ON CONFLICT (log_id) DO NOTHING``, so a row
written twice (a retried batch, a replayed spool file) is stored once.

Failures: transient errors are retried with exponential backoff and full jitter;
a batch that still fails is recorded on the circuit breaker and spooled. While
the breaker is open batches go straight to the spool. A replayer thread, while
the breaker is closed, seals our spool file and replays every spool file no live
process holds (ours, and those of dead or restarted workers).

Never lose a row: a row leaves memory only once it is committed to PostgreSQL or
written to the spool; the spool drops (and counts) a row only when it is full.

Threads are started by ``start()``, after gunicorn's fork, never at import.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from falcon_svc import metrics
from falcon_svc.resilience import CircuitBreaker, RetryPolicy, State, retry
from falcon_svc.spool import Record, Spool

logger = logging.getLogger(__name__)

# submit() reports the queue depth when it reaches a multiple of this.
QUEUE_DEPTH_REPORT_EVERY = 16

DEPENDENCY = "postgres"


@dataclass(slots=True)
class LogRow:
    """One answered request, as stored in ``request_log``.

    ``received_at`` is Unix epoch seconds as a float (``time.time()``): the
    cheapest timestamp to take on the request path, and exact in JSON for the
    spool; PostgreSQL turns it into a ``timestamptz`` with ``to_timestamp``.
    ``text`` is kept only when the log was built with ``log_text=True``
    (LOG_REQUEST_TEXT); otherwise ``submit`` blanks it before it is queued or spooled.
    """

    log_id: str
    request_id: str
    received_at: float
    route: str | None
    method: str | None
    status: int | None
    worker_id: str | None
    model_version: str | None
    label: str | None
    confidence: float | None
    n_texts: int | None
    cache_hit: bool | None
    idempotent_replay: bool | None
    latency_ms: float | None
    text_length: int | None
    text_sha256: str | None
    text: str | None = None


COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LogRow))
_COLUMN_LIST = ", ".join(COLUMNS)
# NOTE: one temporary table per connection, created when the pool opens it;
# ON COMMIT DELETE ROWS empties it after every batch without catalog churn.
_STAGING_DDL = """
CREATE TEMPORARY TABLE request_log_staging (
    log_id text, request_id text, received_at double precision, route text, method text, status smallint,
    worker_id text, model_version text, label text, confidence double precision, n_texts integer,
    cache_hit boolean, idempotent_replay boolean, latency_ms double precision, text_length integer,
    text_sha256 text, text text
) ON COMMIT DELETE ROWS
"""
_COPY = f"COPY request_log_staging ({_COLUMN_LIST}) FROM STDIN"
_MOVE = (
    f"INSERT INTO request_log ({_COLUMN_LIST}) "
    f"SELECT {_COLUMN_LIST.replace('received_at', 'to_timestamp(received_at)')} FROM request_log_staging "
    "ON CONFLICT (log_id) DO NOTHING"
)


def row_record(row: LogRow) -> Record:
    """Return ``row`` as the JSON-ready dict the spool stores."""
    return {name: getattr(row, name) for name in COLUMNS}


def is_transient(ex: BaseException) -> bool:
    """Tell whether retrying might help: lost or refused connections, timeouts, shutdowns, pool timeouts.

    NOTE: psycopg maps connection failures, admin shutdown (57P01), query
    cancellation / statement timeout (57014), serialization failures and
    psycopg_pool.PoolTimeout all to OperationalError subclasses.
    """
    return isinstance(ex, psycopg.OperationalError | psycopg.InterfaceError | TimeoutError | ConnectionError)


# NOTE: errors caused by a row's content (bad value, NOT NULL); anything else
# (missing table, no privilege) is about the database and must keep the rows.
_POISON = (psycopg.DataError, psycopg.IntegrityError)


class _Batch:
    """Rows taken off the queue; whoever claims it first (writer or ``close``) decides its fate."""

    __slots__ = ("_claimed", "_lock", "done", "rows")

    def __init__(self, rows: list[LogRow]) -> None:
        self.rows = rows
        self.done = threading.Event()
        self._claimed = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Return True exactly once: to the first caller, who then owns the rows."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
            return not claimed


class RequestLog:
    """Queue request-log rows in memory and write them to PostgreSQL in batches from a thread."""

    def __init__(
        self,
        dsn: str,
        spool: Spool,
        breaker: CircuitBreaker,
        retry_policy: RetryPolicy,
        *,
        buffer_max: int = 1000,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        log_text: bool = False,
        replay_interval: float = 5.0,
        connect_timeout: int = 2,
        pool_timeout: float = 2.0,
        reconnect_timeout: float = 10.0,
        statement_timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dsn = dsn
        self._spool = spool
        self._breaker = breaker
        self._retry_policy = retry_policy
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._log_text = log_text
        self._replay_interval = replay_interval
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._reconnect_timeout = reconnect_timeout
        self._statement_timeout = statement_timeout
        self._sleep = sleep
        self._clock = clock
        self._buffer_max = buffer_max
        # NOTE: a deque under one condition rather than queue.Queue, so that taking
        # rows and marking them in flight is atomic with respect to close(): every
        # row is always either queued or in a batch close() can see.
        self._rows: deque[LogRow] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._stopping = threading.Event()
        self._deadline: float | None = None
        self._inflight: _Batch | None = None
        self._last_ok: bool | None = None
        self._pool: ConnectionPool | None = None
        self._threads: list[threading.Thread] = []

    # --- the request path -----------------------------------------------------

    def submit(self, row: LogRow) -> None:
        """Hand ``row`` over for logging: never blocks on PostgreSQL, never raises.

        NOTE: when the queue is full (PostgreSQL slow or down) the row is written
        to the spool from this thread: one ``write(2)``, still microseconds.
        """
        try:
            if row.text is not None and not self._log_text:
                row.text = None
            with self._cond:
                if not self._closed and len(self._rows) < self._buffer_max:
                    self._rows.append(row)
                    queued = len(self._rows)
                    # NOTE: wake the writer only when it can act: first row, or a full batch.
                    if queued in (1, self._batch_size):
                        self._cond.notify()
                    # A writer stuck in a slow PostgreSQL does not report the backlog
                    # growing behind it; report it here, every few rows to stay cheap.
                    if queued % QUEUE_DEPTH_REPORT_EVERY == 0:
                        metrics.LOG_QUEUE_DEPTH.set(queued)
                    return
            self._spool.append([row_record(row)])
        except Exception:
            # NOTE: logging must never fail a request; this is a bug, so say so loudly.
            metrics.LOG_ROWS.labels("dropped").inc()
            logger.exception("request-log row dropped: submit failed")

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Open the connection pool (without waiting for PostgreSQL) and start the writer and replayer threads."""
        if self._threads:
            return
        self._pool = ConnectionPool(
            self._dsn,
            min_size=1,
            max_size=2,  # NOTE: one for the writer, one for the replayer
            open=False,
            name="request-log",
            timeout=self._pool_timeout,
            # NOTE: the pool gives up a reconnection attempt after this long, and the
            # next getconn starts a new one: it never stops trying, and a connection
            # is back within about reconnect_timeout of PostgreSQL returning.
            reconnect_timeout=self._reconnect_timeout,
            reconnect_failed=lambda _pool: logger.warning("request-log: PostgreSQL still unreachable, retrying"),
            check=ConnectionPool.check_connection,
            configure=_configure,
            num_workers=1,
            kwargs={
                "connect_timeout": self._connect_timeout,
                "application_name": "falcon-svc request log",
                "options": f"-c statement_timeout={int(self._statement_timeout * 1000)}",
            },
        )
        self._pool.open(wait=False)
        self._threads = [
            threading.Thread(target=self._write_loop, name="request-log-writer", daemon=True),
            threading.Thread(target=self._replay_loop, name="request-log-replayer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float) -> None:
        """Flush queued rows to PostgreSQL within ``timeout`` seconds; spool whatever is left.

        Called from gunicorn's ``worker_exit``. Rows submitted after this go to the spool.
        """
        self._deadline = self._clock() + timeout
        with self._cond:
            self._closed = True
            self._stopping.set()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, self._deadline - self._clock()))
        with self._cond:
            batch, self._inflight = self._inflight, None
            leftovers = list(self._rows)
            self._rows.clear()
        if batch is not None:
            if batch.claim():
                # NOTE: the writer is stuck in PostgreSQL; if its transaction commits
                # after all, replay finds the rows there and skips them.
                leftovers[:0] = batch.rows
            else:
                batch.done.wait(1.0)  # the writer owns it and is spooling it right now
        if leftovers:
            self._spool.append([row_record(row) for row in leftovers])
            logger.warning("request-log: spooled %d rows not written before shutdown", len(leftovers))
        self._spool.close()
        metrics.LOG_QUEUE_DEPTH.set(0)
        if self._pool is not None:
            self._pool.close(timeout=1.0)

    def status(self) -> dict[str, Any]:
        """Return the readiness detail: PostgreSQL state, rows queued, bytes spooled.

        ``postgres`` is ``circuit_open``, ``up`` / ``down`` (last write), or
        ``unknown`` before the first write.
        """
        if self._breaker.state is State.OPEN:
            postgres = "circuit_open"
        elif self._last_ok is None:
            postgres = "unknown"
        else:
            postgres = "up" if self._last_ok else "down"
        return {"postgres": postgres, "queue_depth": len(self._rows), "spool_bytes": self._spool.size_bytes()}

    # --- the writer thread ----------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._take_batch()
            metrics.LOG_QUEUE_DEPTH.set(len(self._rows))
            if batch is not None:
                try:
                    self._deliver(batch)
                except Exception:
                    # NOTE: unreachable unless there is a bug; keep the thread alive.
                    logger.exception("request-log writer failed")
            elif self._stopping.is_set():
                return

    def _take_batch(self) -> _Batch | None:
        """Wait for a row, then up to flush_interval for a full batch; mark the rows in flight."""
        with self._cond:
            if not self._rows and not self._closed:
                self._cond.wait(self._flush_interval)
            if not self._rows:
                return None
            if len(self._rows) < self._batch_size:
                self._cond.wait_for(lambda: len(self._rows) >= self._batch_size or self._closed, self._flush_interval)
            count = min(self._batch_size, len(self._rows))
            batch = _Batch([self._rows.popleft() for _ in range(count)])
            self._inflight = batch
            return batch

    def _deliver(self, batch: _Batch) -> None:
        """Write one batch, or spool it: breaker open, retries exhausted, or shutdown deadline passed."""
        try:
            records = [row_record(row) for row in batch.rows]
            if self._past_deadline() or not self._breaker.allow():
                if batch.claim():
                    self._spool.append(records)
                return
            started = time.perf_counter()
            try:
                self._write(records, "write_batch")
            except Exception as ex:
                self._breaker.record_failure()
                self._mark(ok=False)
                logger.warning(
                    "request-log: batch of %d rows not written (%s: %s); spooling it",
                    len(records),
                    type(ex).__name__,
                    ex,
                    exc_info=not is_transient(ex),
                )
                if batch.claim():
                    self._spool.append(records)
                return
            self._breaker.record_success()
            self._mark(ok=True)
            batch.claim()
            metrics.LOG_ROWS.labels("written").inc(len(records))
            metrics.LOG_BATCH_LATENCY.observe(time.perf_counter() - started)
        finally:
            batch.done.set()
            with self._cond:
                if self._inflight is batch:
                    self._inflight = None

    # --- the replayer thread --------------------------------------------------

    def _replay_loop(self) -> None:
        # NOTE: the first pass runs at once, so a restarted worker replays what
        # its predecessor spooled without waiting a whole interval.
        while not self._stopping.is_set():
            try:
                self._replay_once()
            except Exception:
                logger.exception("request-log replayer failed")
            self._stopping.wait(self._replay_interval)

    def _replay_once(self) -> None:
        """Replay the spool if PostgreSQL is healthy, or as the half-open breaker's trial call.

        NOTE: without the trial, a breaker that opened during an outage would stay
        half-open until new traffic arrived, and the spool would wait for it.
        """
        if self._spool.size_bytes(refresh=True) == 0:
            return
        state = self._breaker.state
        if state is State.OPEN:
            return
        if state is State.HALF_OPEN and not self._probe():
            return
        try:
            replayed = self._spool.replay(
                self._replay_batch, batch_size=self._batch_size, should_stop=self._stopping.is_set
            )
        except Exception as ex:
            self._breaker.record_failure()
            self._mark(ok=False)
            logger.warning(
                "request-log: spool replay stopped (%s: %s)", type(ex).__name__, ex, exc_info=not is_transient(ex)
            )
            return
        if replayed:
            logger.info("request-log: replayed %d spooled rows", replayed)

    def _probe(self) -> bool:
        """Spend the half-open breaker's trial on a ``SELECT 1``; return whether it closed the breaker."""
        if not self._breaker.allow() or self._pool is None:
            return False
        try:
            with self._pool.connection(timeout=self._pool_timeout) as conn:
                conn.execute("SELECT 1")
        except Exception as ex:
            self._breaker.record_failure()
            self._mark(ok=False)
            logger.info("request-log: PostgreSQL still unavailable (%s: %s)", type(ex).__name__, ex)
            return False
        self._breaker.record_success()
        self._mark(ok=True)
        return True

    def _replay_batch(self, records: list[Record]) -> None:
        try:
            self._write(records, "replay_batch")
            written = len(records)
        except _POISON as ex:
            logger.error("request-log: PostgreSQL rejected a replayed batch (%s); retrying its rows one by one", ex)
            written = self._replay_row_by_row(records)
        self._breaker.record_success()
        self._mark(ok=True)
        metrics.LOG_ROWS.labels("replayed").inc(written)

    def _replay_row_by_row(self, records: list[Record]) -> int:
        """Write rows singly so one bad row cannot block its spool file forever; set the bad ones aside."""
        rejected: list[Record] = []
        reason = ""
        for record in records:
            try:
                self._write([record], "replay_row")
            except _POISON as ex:
                rejected.append(record)
                reason = f"{type(ex).__name__}: {ex}"
        self._spool.reject(rejected, reason)
        return len(records) - len(rejected)

    # --- PostgreSQL -----------------------------------------------------------

    def _write(self, records: Sequence[Mapping[str, Any]], operation: str) -> None:
        """Write ``records`` in one transaction, retrying transient errors (not past the close deadline)."""
        values = [_copy_values(record) for record in records]
        pool = self._pool
        if pool is None:
            raise RuntimeError("RequestLog.start() was not called")

        def attempt() -> None:
            started = time.perf_counter()
            try:
                with pool.connection(timeout=self._connection_wait()) as conn, conn.cursor() as cur:
                    with cur.copy(_COPY) as copy:
                        for value in values:
                            copy.write_row(value)
                    cur.execute(_MOVE)
            finally:
                metrics.DEPENDENCY_LATENCY.labels(DEPENDENCY, operation).observe(time.perf_counter() - started)

        retry(
            attempt,
            self._retry_policy,
            is_transient=lambda ex: is_transient(ex) and not self._past_deadline(),
            sleep=self._sleep,
            on_retry=self._on_retry,
        )

    def _on_retry(self, attempt: int, ex: BaseException) -> None:
        metrics.RETRIES.labels(DEPENDENCY).inc()
        logger.info("request-log: retrying PostgreSQL write (attempt %d failed: %s)", attempt, ex)

    def _connection_wait(self) -> float:
        if self._deadline is None:
            return self._pool_timeout
        return max(0.05, min(self._pool_timeout, self._deadline - self._clock()))

    def _past_deadline(self) -> bool:
        return self._deadline is not None and self._clock() >= self._deadline

    def _mark(self, *, ok: bool) -> None:
        self._last_ok = ok
        metrics.DEPENDENCY_UP.labels(DEPENDENCY).set(1 if ok else 0)


def _configure(conn: psycopg.Connection) -> None:
    """Prepare a new pooled connection: create its staging table."""
    conn.execute(_STAGING_DDL)
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
