"""Give spooled request-log rows back to PostgreSQL once it is healthy: the replayer thread.

Each pass, when anything is spooled: nothing while the breaker is open; while it
is half-open, a probe spends the breaker's one trial call; once it is closed,
``Spool.replay`` seals our spool file and feeds every file no live process holds
(ours, and those of dead or restarted workers) to the writer in batches. A batch
PostgreSQL refuses for a row's content is written row by row, and the refused
rows are set aside, so one bad row never blocks its spool file. Each pass also
lets the spool delete rejected rows past their retention (``Spool.clean_rejected``,
which acts at most once an hour).

Speed: an outage of N minutes at full load must drain in a small fraction of N,
so replay writes large batches (``REPLAY_BATCH_ROWS``, one transaction each) of
spooled JSON lines that PostgreSQL parses itself (docs/BENCHMARKS.md, "Spool
replay"). A refused batch is halved until its halves are small enough to write
row by row: one bad row in 10,000 costs about 40 writes, not 10,000.
Progress (``progress()``) is in ``/readyz``'s detail; in metrics, the rate is
``falcon_request_log_rows_total{outcome="replayed"}`` and each batch's time is in
``falcon_dependency_call_duration_seconds_bucket{operation="replay_batch"}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from falcon_svc import metrics
from falcon_svc.requestlog.spool import Spool
from falcon_svc.requestlog.spool_batches import SpooledBatch
from falcon_svc.requestlog.spool_files import Record
from falcon_svc.requestlog.writer import Writer
from falcon_svc.resilience import CircuitBreaker, State, guarded_call

logger = logging.getLogger(__name__)

WriteWithRetries = Callable[[Sequence[Mapping[str, Any]], str], None]

# Rows per replayed batch: one transaction each. Measured (scripts/bench/bench_replay.py,
# docs/BENCHMARKS.md): 200-row batches decoded in Python replayed 15,000 to 22,000 rows/s,
# 10,000-row batches of raw lines 37,000 to 47,000; 20,000-row ones about 49,000 (a side
# experiment): little gain for twice the memory (5 MB of lines per 10,000 rows without
# text; spool_batches.MAX_BATCH_BYTES bounds it).
REPLAY_BATCH_ROWS = 10_000
# A refused batch this small or smaller is written row by row; a larger one is halved first.
ROW_BY_ROW_MAX = 16


class Replayer:
    """Replay the spool every ``interval`` seconds until ``stopping`` is set."""

    def __init__(
        self,
        spool: Spool,
        breaker: CircuitBreaker,
        writer: Writer,
        write: WriteWithRetries,
        *,
        batch_size: int,
        interval: float,
        stopping: threading.Event,
        report: Callable[[bool], None],
        live_bytes: Callable[[], int] | None = None,
    ) -> None:
        """``write(records, operation)`` is the queue's retrying write; ``report(ok)`` gets each outcome.

        ``live_bytes()`` is the size of this process's open write-ahead segments: in
        the directory, but nothing to replay.
        """
        self._spool = spool
        self._breaker = breaker
        self._writer = writer
        self._write = write
        self._batch_size = batch_size
        self._interval = interval
        self._stopping = stopping
        self._report = report
        self._live_bytes = live_bytes or (lambda: 0)
        self._wake = threading.Event()
        self._progress_lock = threading.Lock()
        self._replayed_rows = 0
        self._last_pass_rows = 0
        self._last_pass_seconds = 0.0
        self._last_rate = 0.0
        self._last_replay_at: float | None = None
        self._replaying = False

    def progress(self) -> dict[str, Any]:
        """Return what replay has done in this process: for ``/readyz``'s detail (the backlog is the spool's)."""
        with self._progress_lock:
            return {
                "replaying": self._replaying,
                "replayed_rows": self._replayed_rows,
                "last_pass_rows": self._last_pass_rows,
                "last_pass_seconds": round(self._last_pass_seconds, 3),
                "last_batch_rows_per_second": round(self._last_rate),
                "last_replayed_at": self._last_replay_at,
            }

    def wake(self) -> None:
        """Start the next pass now rather than at the end of the interval (new files to replay, or a stop)."""
        self._wake.set()

    def run(self) -> None:
        """Replay until stopped: the replayer thread's body."""
        # NOTE: the first pass runs at once, so a restarted worker replays what
        # its predecessor spooled without waiting a whole interval; wake() (a dead
        # worker's write-ahead segment, one handed over) starts one at once too.
        while not self._stopping.is_set():
            try:
                replayed = self.replay_once()
            except Exception:
                logger.exception("request-log replayer failed")
                replayed = 0
            # NOTE: a pass that wrote rows goes again at once: more segments are handed
            # over while it runs (an outage's backlog arrives over the next seconds).
            if not replayed:
                self._wake.wait(self._interval)
            self._wake.clear()

    def replay_once(self) -> int:
        """Replay the spool if PostgreSQL is healthy, or as the half-open breaker's trial call; return rows written.

        NOTE: without the trial, a breaker that opened during an outage would stay
        half-open until new traffic arrived, and the spool would wait for it.
        """
        # NOTE: first, whatever PostgreSQL's state: rejected rows age out even during an outage.
        self._spool.clean_rejected()
        # NOTE: rejected rows are never replayed, so a spool holding only them waits for
        # nothing; nor does one holding only this process's open write-ahead segments.
        if self._spool.size_bytes(refresh=True) - self._spool.rejected_bytes() - self._live_bytes() <= 0:
            return 0
        state = self._breaker.state
        if state is State.OPEN or (state is State.HALF_OPEN and not self._probe()):
            return 0
        # NOTE: a connection before the pass's clock starts: a pool reconnecting to a
        # PostgreSQL that has just come back takes a second or so, a cost of the outage,
        # once, not of the replay's rate (the drill times the whole drain too). Without
        # one (a new worker's closed breaker during an outage) there is no pass: it could
        # only fail. The half-open trial (_probe) has made its round trip already.
        if state is State.CLOSED and not self._writer.warm_up():
            return 0
        with self._progress_lock:
            self._replaying = True
        started = time.perf_counter()
        try:
            replayed = self._spool.replay(
                self._replay_batch, batch_size=self._batch_size, should_stop=self._stopping.is_set
            )
        except Exception as ex:
            logger.warning(
                "request-log: spool replay stopped (%s: %s)",
                type(ex).__name__,
                ex,
                exc_info=not isinstance(ex, self._writer.transient_errors),
            )
            return 0
        finally:
            with self._progress_lock:
                self._replaying = False
        seconds = time.perf_counter() - started
        with self._progress_lock:
            self._last_pass_rows = replayed
            self._last_pass_seconds = seconds
        if replayed:
            # NOTE: the drill (scripts/faults/postgres_down.sh) reads this line: the
            # replay's rate is the rows of the passes over the time they ran.
            logger.info(
                "request-log: replayed %d spooled rows in %.3f s (%.0f rows/s)",
                replayed,
                seconds,
                replayed / max(seconds, 1e-6),
            )
        return replayed

    def _probe(self) -> bool:
        """Spend the half-open breaker's trial on a round trip; return whether it closed the breaker."""
        attempt = guarded_call(self._breaker, self._writer.probe)
        if attempt.refused:
            return False
        self._report(attempt.ok)
        ex = attempt.error
        if ex is not None:
            logger.info("request-log: PostgreSQL still unavailable (%s: %s)", type(ex).__name__, ex)
        return attempt.ok

    def _replay_batch(self, records: SpooledBatch) -> None:
        """Write one spooled batch (the pass was admitted already); raise to stop the replay, keeping the file."""
        started = time.perf_counter()
        attempt = guarded_call(self._breaker, lambda: self._write_replayed(records), ask_breaker=False)
        self._report(attempt.ok)
        if attempt.error is not None:
            raise attempt.error
        written = attempt.value or 0
        rate = written / max(time.perf_counter() - started, 1e-6)
        metrics.LOG_ROWS.labels("replayed").inc(written)
        with self._progress_lock:
            self._replayed_rows += written
            self._last_rate = rate
            self._last_replay_at = time.time()

    def _write_replayed(self, records: Sequence[Record]) -> int:
        """Write a spooled batch, halved then row by row if PostgreSQL refuses a row's content; return rows written."""
        try:
            self._write(records, "replay_batch")
        except self._writer.poison_errors as ex:
            if len(records) > ROW_BY_ROW_MAX:
                logger.warning("request-log: PostgreSQL rejected a replayed batch (%s); retrying it in halves", ex)
                return self._write_halves(records)
            logger.error("request-log: PostgreSQL rejected a replayed batch (%s); retrying its rows one by one", ex)
            return self._write_row_by_row(records)
        return len(records)

    def _write_halves(self, records: Sequence[Record]) -> int:
        """Write each half of a refused batch (its decoded records), halving again the one that is refused."""
        middle = len(records) // 2
        return self._write_replayed(records[:middle]) + self._write_replayed(records[middle:])

    def _write_row_by_row(self, records: Sequence[Record]) -> int:
        """Write rows singly so one bad row cannot block its spool file forever; set the bad ones aside."""
        rejected: list[Record] = []
        reason = ""
        for record in records:
            try:
                self._write([record], "replay_row")
            except self._writer.poison_errors as ex:
                rejected.append(record)
                reason = f"{type(ex).__name__}: {ex}"
        self._spool.reject(rejected, reason)
        return len(records) - len(rejected)
