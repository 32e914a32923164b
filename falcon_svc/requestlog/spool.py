"""Keep request-log rows on local disk while PostgreSQL cannot take them, and give them back later.

The spool is a directory shared by every worker process of a host. Each process
appends JSON lines to a file of its own, locked while it is active (the files
themselves: ``spool_files``). ``replay`` takes the finished files one at a time,
hands their rows to a writer in batches and deletes each file once all its rows
are written. The writer must be idempotent (``ON CONFLICT DO NOTHING``): a replay
interrupted half-way through a file is simply repeated.

Durability: every append is one ``write(2)`` straight to the OS (no user-space
buffer), so a crashed worker loses nothing; only the page cache stands between a
row and the disk until ``seal``/``close`` fsyncs, which covers a process crash
but not a power cut. A crash mid-write leaves a truncated last line, which replay
skips and logs.

The whole directory is bounded by ``max_bytes``: past it a row is dropped,
counted (``falcon_request_log_rows_total{outcome="dropped"}``) and logged, at
most once per ``drop_log_interval``. A failed write (disk full, permission
denied) drops its rows the same way, and is logged at most once per
``error_log_interval`` with the count of failures in between.

Rows PostgreSQL refuses for their content are set aside in ``rejected-`` files
(counted as ``outcome="rejected"``, their size in
``falcon_request_log_rejected_bytes``), never replayed. They count towards
``max_bytes``, so ``clean_rejected`` (the replayer calls it; it acts at most once
per ``clean_interval``) deletes them after ``rejected_retention`` seconds, and
sooner, oldest first, while they take more than half of ``max_bytes``: rows set
aside must never leave an outage no room. A row is lost only past the bound,
on a failed write, or when its rejected file is deleted: always counted or logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from falcon_svc import metrics
from falcon_svc.logs import LogThrottle
from falcon_svc.requestlog.spool_batches import SpooledBatch, replay_files
from falcon_svc.requestlog.spool_files import (
    REJECTED_PREFIX,
    WAL_PREFIX,
    create_locked,
    encode,
    finish,
    remove_abandoned_new_files,
    remove_rejected,
    replayable_files,
    write_rejected,
)

logger = logging.getLogger(__name__)

DAY = 86_400.0
# NOTE: rejected rows may fill at most this share of max_bytes (as 1/N): past it
# the oldest are deleted early, so that what an operator has not looked at yet
# cannot make the spool drop the rows of the next outage.
REJECTED_SHARE_DIVISOR = 2
# A cleaning pass names at most this many of the files it deleted in its log line.
_NAMES_SHOWN = 10


def log_throttled(log: logging.Logger, lines: LogThrottle, message: str, *args: object) -> None:
    """Log an error if ``lines`` lets one through now, saying how many such failures it held back since the last."""
    failures = lines.admit()
    if failures is not None:
        log.error(
            f"{message} (%d more failures since the last such line)",
            *args,
            failures - 1,
            extra={"suppressed_errors": failures - 1},
        )


class Spool:
    """An append-only, size-bounded, multi-process store of JSON records in one directory.

    Thread-safe within a process: request threads (queue full) and the log
    writer append concurrently.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        refresh_interval: float = 1.0,
        drop_log_interval: float = 60.0,
        error_log_interval: float = 10.0,
        rejected_retention: float = 7 * DAY,
        clean_interval: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` paces the scans, log lines and cleaning; ``wall_clock`` dates rejected files (their mtime)."""
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.rejected_retention = rejected_retention
        self._refresh_interval = refresh_interval
        self._clean_interval = clean_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._pid = os.getpid()
        self._seq = 0
        # NOTE: other processes' appends are only seen at the next directory scan,
        # so the bound can be overshot by what the other workers append within one
        # refresh_interval; our own appends are counted at once.
        self._scanned_bytes = 0
        self._rejected_bytes = 0
        self._segment_bytes: dict[str, int] = {}
        self._appended_since_scan = 0
        self._scanned_at: float | None = None
        self._cleaned_at: float | None = None
        self._drop_lines = LogThrottle(drop_log_interval, clock)
        self._error_lines = LogThrottle(error_log_interval, clock)

    # --- appending --------------------------------------------------------------

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Store ``records`` as JSON lines; return how many were stored.

        Never raises: a record that cannot be encoded or does not fit is dropped,
        counted and logged, because the caller is the request path or the writer
        of last resort and has nowhere else to put it.
        """
        lines: list[bytes] = []
        for record in records:
            try:
                lines.append(encode(record))
            except (TypeError, ValueError) as ex:
                logger.error("request-log row cannot be spooled (dropped): %s", ex)
                self._count_dropped(1, "unencodable")
        if not lines:
            return 0
        with self._lock:
            fitting = self._take_fitting(lines)
            stored, broken = self._write_lines(fitting) if fitting else (0, None)
            spool_bytes = self._scanned_bytes + self._appended_since_scan
        if broken is not None:
            finish(*broken)
        if stored:
            metrics.LOG_ROWS.labels("spooled").inc(stored)
        if stored < len(lines):
            self._count_dropped(len(lines) - stored, "spool full" if len(fitting) < len(lines) else "write error")
        metrics.LOG_SPOOL_BYTES.set(spool_bytes)
        return stored

    def reserve(self, size: int) -> bool:
        """Count ``size`` bytes another writer (the write-ahead log) is about to add; False if they do not fit.

        NOTE: on the request path: the directory is scanned again only when the
        bytes seem not to fit and the last scan is stale, not on every call.
        """
        with self._lock:
            if self._scanned_bytes + self._appended_since_scan + size > self.max_bytes:
                self._refresh_size_locked(force=False)
                if self._scanned_bytes + self._appended_since_scan + size > self.max_bytes:
                    return False
            self._appended_since_scan += size
            return True

    def _take_fitting(self, lines: list[bytes]) -> list[bytes]:
        """Return the lines that fit under the directory bound (caller holds the lock)."""
        self._refresh_size_locked(force=False)
        used = self._scanned_bytes + self._appended_since_scan
        fitting = []
        for line in lines:
            if used + len(line) <= self.max_bytes:
                fitting.append(line)
                used += len(line)
        return fitting

    def _write_lines(self, lines: list[bytes]) -> tuple[int, tuple[int, Path | None] | None]:
        """Write whole lines to the active file in one syscall if possible.

        Returns the number of lines written and, after a write error, the
        detached file for the caller to finish outside the lock.
        """
        data = b"".join(lines)
        written = 0
        broken = None
        try:
            fd = self._active_fd()
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as ex:
            # NOTE: seal so that a partial line can only ever be the file's last
            # line, which replay recognises and skips.
            self._log_error("request-log spool write failed in %s: %s", self.directory, ex)
            broken = self._detach_locked()
        self._appended_since_scan += written
        stored, offset = 0, 0
        for line in lines:
            offset += len(line)
            if offset > written:
                break
            stored += 1
        return stored, broken

    def _active_fd(self) -> int:
        if self._fd is not None and self._pid != os.getpid():
            # NOTE: inherited across a fork: the lock belongs to the parent's file.
            os.close(self._fd)
            self._fd, self._path = None, None
        if self._fd is None:
            self._open_locked()
        assert self._fd is not None
        return self._fd

    def _open_locked(self) -> None:
        self._pid = os.getpid()
        self._seq += 1
        self._fd, self._path = create_locked(self.directory, self._pid, self._seq)

    # --- sealing ----------------------------------------------------------------

    def seal(self) -> None:
        """Finish the active file (fsync, unlock) so it can be replayed; the next append starts a new one."""
        with self._lock:
            detached = self._detach_locked()
        if detached is not None:
            # NOTE: fsync outside the lock: request threads appending must not wait for the disk.
            finish(*detached)

    def close(self) -> None:
        """Seal the active file: called on shutdown so the next start (or another worker) replays it."""
        self.seal()

    def _detach_locked(self) -> tuple[int, Path | None] | None:
        fd, path = self._fd, self._path
        self._fd, self._path = None, None
        if fd is None:
            return None
        if self._pid != os.getpid():
            os.close(fd)
            return None
        return fd, path

    # --- size -------------------------------------------------------------------

    def size_bytes(self, *, refresh: bool = False) -> int:
        """Return the bytes spooled in the whole directory (every process), as of the last scan."""
        with self._lock:
            self._refresh_size_locked(force=refresh)
            size = self._scanned_bytes + self._appended_since_scan
            rejected = self._rejected_bytes
        metrics.LOG_SPOOL_BYTES.set(size)
        metrics.LOG_REJECTED_BYTES.set(rejected)
        return size

    def rejected_bytes(self) -> int:
        """Return the bytes of rejected rows kept in the directory (part of ``size_bytes``), as of the last scan."""
        with self._lock:
            return self._rejected_bytes

    def segment_bytes(self) -> dict[str, int]:
        """Return the size of each write-ahead segment (part of ``size_bytes``) by file name, as of the last scan."""
        with self._lock:
            return dict(self._segment_bytes)

    def _refresh_size_locked(self, *, force: bool) -> None:
        now = self._clock()
        if not force and self._scanned_at is not None and now - self._scanned_at < self._refresh_interval:
            return
        total = rejected = 0
        segments = {}
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if entry.name.endswith(".jsonl"):
                        with contextlib.suppress(FileNotFoundError):
                            size = entry.stat().st_size
                            total += size
                            if entry.name.startswith(REJECTED_PREFIX):
                                rejected += size
                            elif entry.name.startswith(WAL_PREFIX):
                                segments[entry.name] = size
        except FileNotFoundError:
            pass  # NOTE: nothing spooled yet; the directory is made on first append
        except OSError as ex:
            # NOTE: keep the last known size; the append that follows reports the real failure.
            logger.debug("cannot scan request-log spool %s: %s", self.directory, ex)
            return
        self._scanned_bytes, self._appended_since_scan, self._scanned_at = total, 0, now
        self._rejected_bytes = rejected
        self._segment_bytes = segments

    # --- replay -----------------------------------------------------------------

    def replay(
        self,
        write: Callable[[SpooledBatch], None],
        *,
        batch_size: int,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Seal our file, then feed every unlocked spool file and write-ahead segment to ``write`` in batches.

        A file is deleted only after ``write`` returned for all its rows. An
        exception from ``write`` stops the replay and propagates; the file stays
        and is replayed again (from its start) next time. Each batch is a
        ``SpooledBatch``: JSON lines as they are on disk, of one file or several,
        decoded on demand.

        Returns:
            The number of rows handed to ``write`` and written.
        """
        self.seal()
        try:
            replayed = replay_files(
                replayable_files(self.directory),
                write,
                batch_size=batch_size,
                should_stop=should_stop,
                drop=self._count_dropped,
            )
            remove_abandoned_new_files(self.directory)
        finally:
            self.size_bytes(refresh=True)
        return replayed

    def reject(self, records: Sequence[Mapping[str, Any]], reason: str) -> None:
        """Set aside rows PostgreSQL refused for their content: kept on disk for an operator, counted as rejected.

        If they cannot be written they are dropped (counted and logged as such).
        """
        if not records:
            return
        try:
            path = write_rejected(self.directory, records)
        except OSError as ex:
            self._log_error("cannot set aside rejected request-log rows in %s: %s", self.directory, ex)
            self._count_dropped(len(records), f"rejected by PostgreSQL and not kept ({reason})")
            return
        metrics.LOG_ROWS.labels("rejected").inc(len(records))
        logger.error(
            "request-log: %d rows rejected by PostgreSQL (%s), kept in %s for %g days",
            len(records),
            reason,
            path,
            self.rejected_retention / DAY,
            extra={"rejected_rows": len(records), "reason": reason},
        )

    def clean_rejected(self) -> None:
        """Delete rejected files past their retention, or the oldest while over their share of the bound.

        Acts at most once per ``clean_interval`` (the first call always acts) and logs what it deleted.
        """
        now = self._clock()
        with self._lock:
            if self._cleaned_at is not None and now - self._cleaned_at < self._clean_interval:
                return
            self._cleaned_at = now
        removed = remove_rejected(
            self.directory,
            modified_before=self._wall_clock() - self.rejected_retention,
            keep_bytes=self.max_bytes // REJECTED_SHARE_DIVISOR,
        )
        if not removed:
            return
        names = [name for name, _size in removed]
        shown = ", ".join(names[:_NAMES_SHOWN]) + (
            f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
        )
        deleted_bytes = sum(size for _name, size in removed)
        logger.warning(
            "request-log: deleted %d rejected-row files (%d bytes) older than %g days or past %d bytes: %s",
            len(removed),
            deleted_bytes,
            self.rejected_retention / DAY,
            self.max_bytes // REJECTED_SHARE_DIVISOR,
            shown,
            extra={"deleted_files": len(removed), "deleted_bytes": deleted_bytes},
        )
        self.size_bytes(refresh=True)

    # --- failures and drops -------------------------------------------------------

    def _log_error(self, message: str, *args: object) -> None:
        """Log a failed write at most once per ``error_log_interval``; each failure is counted by its dropped rows."""
        log_throttled(logger, self._error_lines, message, *args)

    def _count_dropped(self, count: int, reason: str) -> None:
        metrics.LOG_ROWS.labels("dropped").inc(count)
        unlogged = self._drop_lines.admit(count)
        if unlogged is None:
            return
        logger.error(
            "dropped %d request-log rows (%s; spool %s, limit %d bytes)",
            unlogged,
            reason,
            self.directory,
            self.max_bytes,
            extra={"dropped_rows": unlogged, "reason": reason},
        )
