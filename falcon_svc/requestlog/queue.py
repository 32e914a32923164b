"""Log every answered request to PostgreSQL without ever slowing or failing a request.

The request path appends the row to the write-ahead log (``wal``: one
``write(2)``, so a killed worker loses no answered row) and puts it into a
bounded in-memory queue (``submit``: microseconds, never blocks, never raises).
A writer thread takes batches off the queue and hands each to the ``Writer``
(``PostgresWriter``: one transaction, and a row written twice is stored once).

Failures: transient errors are retried with exponential backoff and full jitter;
a batch that still fails is recorded on the circuit breaker and set aside for
replay. While the breaker is open batches are set aside at once, as are rows
that find the queue full. Setting aside a row that is in the write-ahead log
only marks its segment to be replayed (the row is on disk already); a row the
log could not take (directory full, disk error, or no log) is written to the
spool. A replayer thread (``replay.Replayer``) gives those rows back once
PostgreSQL is healthy.

Never lose a row: a row leaves memory only once it is committed to PostgreSQL or
on disk for replay; the spool drops (and counts) a row only when it is full.

Shutdown (``close``) is quick: one flush of the queue to a healthy PostgreSQL
within ``close_flush_seconds`` (no retries, no backoff), then whatever is not
committed is left on disk for replay, at once.

Threads are started by ``start()``, after gunicorn's fork, never at import.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from falcon_svc import metrics
from falcon_svc.requestlog.replay import REPLAY_BATCH_ROWS, Replayer
from falcon_svc.requestlog.rows import LogRow, encode_row, row_record
from falcon_svc.requestlog.spool import Spool
from falcon_svc.requestlog.wal import Segment, WriteAheadLog
from falcon_svc.requestlog.writer import Writer
from falcon_svc.resilience import REFUSED, CircuitBreaker, RetryPolicy, State, guarded_call, retry

logger = logging.getLogger(__name__)

# submit() reports the queue depth when it reaches a multiple of this.
QUEUE_DEPTH_REPORT_EVERY = 16
# NOTE: the least time a write near the close deadline gets to find a connection:
# a zero or negative wait would fail it without even trying.
_LAST_CONNECTION_WAIT = 0.05
# How long close() lets the writer flush the queue to PostgreSQL: a stopping worker
# must be gone in well under 250 ms (issue 12); rows not written by then are on disk.
CLOSE_FLUSH_SECONDS = 0.05
# The least time close() gives the pool to stop its threads (one reconnecting to a
# PostgreSQL that is down would otherwise be waited for up to its timeout).
_POOL_CLOSE_SECONDS = 0.02

# A queued row and the write-ahead segment holding it (None: in memory only).
Entry = tuple[LogRow, Segment | None]


class _Batch:
    """Rows taken off the queue; whoever claims it first (writer or ``close``) decides its fate."""

    __slots__ = ("_claimed", "_lock", "done", "entries")

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.done = threading.Event()
        self._claimed = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Return True exactly once: to the first caller, who then owns the rows."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
            return not claimed


class _Duration:
    """Keep the duration ``guarded_call`` measured, to report it only for a batch that was written."""

    seconds = 0.0

    def observe(self, amount: float) -> None:
        self.seconds = amount


class RequestLog:
    """Queue request-log rows in memory and write them to PostgreSQL in batches from a thread."""

    def __init__(
        self,
        writer: Writer,
        spool: Spool,
        breaker: CircuitBreaker,
        retry_policy: RetryPolicy,
        *,
        buffer_max: int = 1000,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        log_text: bool = False,
        replay_interval: float = 5.0,
        replay_batch_size: int = REPLAY_BATCH_ROWS,
        wal: WriteAheadLog | None = None,
        close_flush_seconds: float = CLOSE_FLUSH_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``wal`` (over the same spool directory) journals every row; without one a killed worker loses its queue."""
        self._writer = writer
        self._spool = spool
        self._wal = wal
        self._close_flush_seconds = close_flush_seconds
        self._breaker = breaker
        self._retry_policy = retry_policy
        self._buffer_max = buffer_max
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._log_text = log_text
        self._sleep = sleep
        self._clock = clock
        # NOTE: a deque under one condition rather than queue.Queue, so that taking
        # rows and marking them in flight is atomic with respect to close(): every
        # row is always either queued or in a batch close() can see.
        self._rows: deque[Entry] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._stopping = threading.Event()
        self._deadline: float | None = None
        self._inflight: _Batch | None = None
        self._last_ok: bool | None = None
        self._threads: list[threading.Thread] = []
        self._replayer = Replayer(
            spool,
            breaker,
            writer,
            self._write,
            batch_size=replay_batch_size,
            interval=replay_interval,
            stopping=self._stopping,
            report=self._report,
            live_bytes=wal.live_bytes if wal is not None else None,
        )

    # --- the request path -----------------------------------------------------

    def submit(self, row: LogRow) -> None:
        """Journal ``row`` and hand it over for logging: never blocks on PostgreSQL, never raises.

        NOTE: the row is on disk (the write-ahead log) before this returns, so
        before the response is sent. When the queue is full (PostgreSQL slow or
        down) a journaled row is simply left for replay; one the log could not
        take is written to the spool from this thread: one ``write(2)``.
        """
        try:
            if row.text is not None and not self._log_text:
                row.text = None
            entry = (row, self._journal(row))
            with self._cond:
                if not self._closed and len(self._rows) < self._buffer_max:
                    self._rows.append(entry)
                    queued = len(self._rows)
                    # NOTE: wake the writer only when it can act: first row, or a full batch.
                    if queued in (1, self._batch_size):
                        self._cond.notify()
                    # A writer stuck in a slow PostgreSQL does not report the backlog
                    # growing behind it; report it here, every few rows to stay cheap.
                    if queued % QUEUE_DEPTH_REPORT_EVERY == 0:
                        metrics.LOG_QUEUE_DEPTH.set(queued)
                    return
            self._set_aside([entry])
        except Exception:
            # NOTE: logging must never fail a request; this is a bug, so say so loudly.
            metrics.LOG_ROWS.labels("dropped").inc()
            logger.exception("request-log row dropped: submit failed")

    def _journal(self, row: LogRow) -> Segment | None:
        """Append ``row`` to the write-ahead log; return its segment, or None if it is in memory only."""
        if self._wal is None:
            return None
        try:
            line = encode_row(row)
        except (TypeError, ValueError):
            # NOTE: still queued: the writer may store it; the spool counts it if it cannot.
            logger.exception("request-log row cannot be journaled")
            return None
        return self._wal.append(line)

    def _set_aside(self, entries: Iterable[Entry]) -> None:
        """Leave rows not written for replay: mark the segments of journaled rows, spool the others."""
        journaled: Counter[Segment] = Counter()
        loose = []
        for row, segment in entries:
            if segment is None:
                loose.append(row_record(row))
            else:
                journaled[segment] += 1
        if journaled:
            assert self._wal is not None
            self._wal.resolve(journaled, keep=True)
            metrics.LOG_ROWS.labels("spooled").inc(journaled.total())
        if loose:
            self._spool.append(loose)

    def _resolve_written(self, entries: Iterable[Entry]) -> None:
        """Tell the write-ahead log these rows are committed, so their segments can go."""
        if self._wal is None:
            return
        written = Counter(segment for _row, segment in entries if segment is not None)
        if written:
            self._wal.resolve(written, keep=False)

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Open the writer (without waiting for PostgreSQL) and start the writer and replayer threads."""
        if self._threads:
            return
        self._writer.open()
        self._threads = [
            threading.Thread(target=self._write_loop, name="request-log-writer", daemon=True),
            threading.Thread(target=self._replayer.run, name="request-log-replayer", daemon=True),
        ]
        if self._wal is not None:
            self._threads.append(threading.Thread(target=self._wal_loop, name="request-log-wal", daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float) -> None:
        """Flush queued rows to PostgreSQL for at most ``close_flush_seconds``/``timeout``; leave the rest on disk.

        Called from gunicorn's ``worker_exit``: quick whatever PostgreSQL does. No
        retries: rows not committed within the flush are in the write-ahead log,
        whose segments are handed over to replay at once (rows it could not take
        are spooled). Rows submitted after this go to the spool.
        """
        self._deadline = self._clock() + min(timeout, self._close_flush_seconds)
        with self._cond:
            self._closed = True
            self._stopping.set()
            self._cond.notify_all()
        self._replayer.wake()
        # NOTE: only the writer is waited for: a replayer in the middle of a batch keeps
        # its file, unfinished, for the next pass (of this host's other workers).
        if self._threads:
            self._threads[0].join(max(0.0, self._deadline - self._clock()))
        with self._cond:
            batch, self._inflight = self._inflight, None
            leftovers = list(self._rows)
            self._rows.clear()
        if batch is not None:
            if batch.claim():
                # NOTE: the writer is stuck in PostgreSQL; if its transaction commits
                # after all, replay finds the rows there and skips them.
                leftovers[:0] = batch.entries
            else:
                batch.done.wait(1.0)  # the writer owns it and is setting it aside right now
        if leftovers:
            self._set_aside(leftovers)
            logger.warning("request-log: %d rows left for replay, not written before shutdown", len(leftovers))
        if self._wal is not None:
            self._wal.close()
        self._spool.close()
        metrics.LOG_QUEUE_DEPTH.set(0)
        self._writer.close(timeout=max(_POOL_CLOSE_SECONDS, self._deadline - self._clock()))

    def status(self) -> dict[str, Any]:
        """Return the readiness detail: PostgreSQL state, rows queued, bytes spooled, bytes of them rejected.

        ``postgres`` is ``circuit_open``, ``up`` / ``down`` (last write), or
        ``unknown`` before the first write. ``rejected_bytes`` (part of
        ``spool_bytes``) are rows PostgreSQL refused, kept for an operator.
        ``replay`` is the backlog replay still has to write (``pending_bytes``:
        the spool less its rejected rows and this process's open write-ahead
        segments; other live workers' open segments, about a second of their
        rows each, are counted in) and this process's replay progress. ``wal`` is the
        write-ahead log's own detail (``WriteAheadLog.status``).
        """
        if self._breaker.state is State.OPEN:
            postgres = "circuit_open"
        elif self._last_ok is None:
            postgres = "unknown"
        else:
            postgres = "up" if self._last_ok else "down"
        spool_bytes = self._spool.size_bytes()
        rejected_bytes = self._spool.rejected_bytes()
        live_bytes = self._wal.live_bytes() if self._wal is not None else 0
        status = {
            "postgres": postgres,
            "queue_depth": len(self._rows),
            "spool_bytes": spool_bytes,
            "rejected_bytes": rejected_bytes,
            "replay": {
                "pending_bytes": max(0, spool_bytes - rejected_bytes - live_bytes),
                **self._replayer.progress(),
            },
        }
        if self._wal is not None:
            status["wal"] = self._wal.status()
        return status

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

    def _wal_loop(self) -> None:
        """Rotate, sync, delete and hand over write-ahead segments; wake the replayer when one is for it."""
        assert self._wal is not None
        while not self._stopping.wait(self._wal.tick):
            try:
                if self._wal.maintain():
                    self._replayer.wake()
            except Exception:
                # NOTE: unreachable unless there is a bug; keep the thread alive.
                logger.exception("request-log write-ahead housekeeping failed")

    def _deliver(self, batch: _Batch) -> None:
        """Write one batch, or set it aside: breaker open, retries exhausted, or shutdown deadline passed."""
        try:
            records = [row_record(row) for row, _segment in batch.entries]
            duration = _Duration()
            # NOTE: past the deadline the breaker is not even asked, so no half-open trial is spent.
            attempt = (
                REFUSED
                if self._past_deadline()
                else guarded_call(self._breaker, lambda: self._write(records, "write_batch"), latency=duration)
            )
            if attempt.ok:
                self._report(ok=True)
                if batch.claim():
                    self._resolve_written(batch.entries)
                metrics.LOG_ROWS.labels("written").inc(len(records))
                metrics.LOG_BATCH_LATENCY.observe(duration.seconds)
                return
            if attempt.error is not None:
                self._report(ok=False)
                logger.warning(
                    "request-log: batch of %d rows not written (%s: %s); spooling it",
                    len(records),
                    type(attempt.error).__name__,
                    attempt.error,
                    exc_info=not isinstance(attempt.error, self._writer.transient_errors),
                )
            if batch.claim():
                self._set_aside(batch.entries)
        finally:
            batch.done.set()
            with self._cond:
                if self._inflight is batch:
                    self._inflight = None

    # --- retries and the close deadline ----------------------------------------

    def _write(self, records: Sequence[Mapping[str, Any]], operation: str) -> None:
        """Write ``records`` in one transaction, retrying transient errors (never once close() has begun)."""
        retry(
            lambda: self._writer.write(records, operation=operation, wait=self._connection_wait()),
            self._retry_policy,
            is_transient=lambda ex: isinstance(ex, self._writer.transient_errors) and self._deadline is None,
            sleep=self._sleep,
            on_retry=self._on_retry,
        )

    def _on_retry(self, attempt: int, ex: BaseException) -> None:
        metrics.RETRIES.labels(self._breaker.name).inc()
        logger.info("request-log: retrying PostgreSQL write (attempt %d failed: %s)", attempt, ex)

    def _connection_wait(self) -> float | None:
        """Return how long a write may wait for a connection: the writer's own limit until close() sets a deadline."""
        if self._deadline is None:
            return None
        return max(_LAST_CONNECTION_WAIT, self._deadline - self._clock())

    def _past_deadline(self) -> bool:
        return self._deadline is not None and self._clock() >= self._deadline

    def _report(self, ok: bool) -> None:
        """Remember the last outcome for ``status()``; ``falcon_dependency_up`` is the breaker's to report.

        A write that succeeds after a failed one means PostgreSQL is back: the
        replayer starts on the backlog now rather than at the end of its interval,
        and the write-ahead segment open through the outage goes to it too.
        """
        recovered = ok and self._last_ok is False
        self._last_ok = ok
        if recovered:
            if self._wal is not None:
                self._wal.rotate_soon()
            self._replayer.wake()
