"""Put every request-log row on local disk before its response is sent: the write-ahead log.

Why: rows wait in memory for the writer thread (up to ``LOG_FLUSH_INTERVAL_MS``,
longer while PostgreSQL is slow), and a worker that is SIGKILLed or OOM-killed
loses them. So ``append`` writes each row, on the request path, to a segment
file of this process: one ``write(2)`` of its spool line, no user-space buffer.
The page cache survives any death of the process; only a power cut (or a kernel
crash) can lose what is not on the disk yet, and ``LOG_FSYNC`` says how much:

- ``off`` (default): the kernel writes pages back within about 30 s
  (``vm.dirty_expire_centisecs``); a power cut loses up to that much of rows not
  yet in PostgreSQL. Any process death loses nothing.
- ``interval``: a thread ``fdatasync``s the segments every ``sync_interval``
  (``LOG_FLUSH_INTERVAL_MS``), off the request path: a power cut loses at most
  that long of rows.
- ``always``: ``fdatasync`` after every append, on the request path (a disk
  flush per request: milliseconds, ``scripts/bench/bench_wal.py``): a power cut
  loses no answered row.

Design: a segment is a spool file (``wal-`` + the spool's name, the spool's line
format, ``flock``ed by its process while open). The writer thread still ships
rows from memory (the fast path); each queued row knows its segment, which
counts the rows whose fate is open. A row is *resolved* when it is committed,
or when it is set aside for replay (its batch failed, the queue was full, the
worker stopped): then the row is already on disk, so it is never written a
second time; its segment is marked ``keep``. The housekeeping thread
(``maintain``) retires the active segment after ``max_age`` seconds or
``max_bytes``; a retired segment whose rows are all resolved is deleted, or, if
marked ``keep``, closed (unlocked) and so handed over to replay, which writes
its rows again, the committed ones included, stored once by ``ON CONFLICT``.
A process that dies leaves its segments unlocked: any live replayer on the host
replays them (``maintain`` notices such segments and wakes the replayer).

Failures never touch the request: when an append cannot be made (the spool
directory at ``LOG_SPOOL_MAX_BYTES``, a full disk, an I/O error) the row is only
in memory, as before this log existed: counted (``status()``'s
``unjournaled_rows``) and logged at most once per ``error_log_interval``. A
failed write retires its segment (cut back to its last whole line), and no new
one is opened for ``retry_interval`` seconds, so a broken disk costs each
request one check of the clock, not a failing syscall.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from falcon_svc.logs import LogThrottle
from falcon_svc.requestlog.spool import Spool, log_throttled
from falcon_svc.requestlog.spool_files import WAL_GLOB, WAL_PREFIX, create_locked, unlocked

logger = logging.getLogger(__name__)

FSYNC_MODES = ("off", "interval", "always")
# NOTE: a segment is replayed whole after a crash or a hand-over, so its age bounds
# the rows written twice then (about a second of them), and rotation costs one
# create and one unlink per second per worker. A segment of committed rows lives
# about max_age plus one batch's write.
SEGMENT_MAX_AGE_SECONDS = 1.0
# A segment with rows set aside for replay (PostgreSQL down or slow), or opened while
# the writer lags behind, lives this long: during an outage every segment is handed
# over, and at one a second each worker would leave 3,600 files an hour for every
# worker's scan (and its log line) to go through, and replay pays a transaction per
# file (a 35 s outage left 140 files of ~250 rows: replay ran at 6,500 rows/s instead
# of 40,000). Replay picks the rows up this much later at most, once PostgreSQL is back.
KEPT_SEGMENT_MAX_AGE_SECONDS = 10.0
SEGMENT_MAX_BYTES = 8 * 2**20
# After a failed open or write, the request path does not try a new segment for this long.
RETRY_INTERVAL_SECONDS = 1.0
# How often maintain() looks for segments of dead processes (a directory listing and one lock probe each).
DEAD_SEGMENT_SCAN_SECONDS = 1.0


class Segment:
    """One write-ahead file of this process, and how many of its rows still wait for their fate."""

    __slots__ = ("bytes", "fd", "keep", "opened_at", "path", "synced_bytes", "unresolved")

    def __init__(self, fd: int, path: Path, opened_at: float) -> None:
        self.fd = fd
        self.path = path
        self.opened_at = opened_at
        self.bytes = 0  # of whole lines appended
        self.synced_bytes = 0  # as of its last fdatasync (LOG_FSYNC=interval)
        self.unresolved = 0
        self.keep = False  # some row must be replayed from this file


class WriteAheadLog:
    """Append rows to this process's segment before they are queued; delete or hand over segments once resolved.

    Thread-safe: request threads append, the writer thread resolves, the
    housekeeping thread maintains; ``close`` may race all three.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        fsync: str = "off",
        sync_interval: float = 0.2,
        max_age: float = SEGMENT_MAX_AGE_SECONDS,
        max_bytes: int = SEGMENT_MAX_BYTES,
        retry_interval: float = RETRY_INTERVAL_SECONDS,
        error_log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``spool`` is the directory and its bound (segments count towards ``LOG_SPOOL_MAX_BYTES``)."""
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self.fsync = fsync
        self._sync_each = fsync == "always"
        self.directory = spool.directory
        self._spool = spool
        self._sync_interval = sync_interval
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._retry_interval = retry_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._active: Segment | None = None
        self._retired: list[Segment] = []
        self._closed = False
        self._rotate_now = False
        self._seq = 0
        self._retry_at: float | None = None
        self._synced_at: float | None = None
        self._scanned_at: float | None = None
        self._announced: set[str] = set()
        self._unjournaled = 0
        self._handed_over = 0
        self._errors = LogThrottle(error_log_interval, clock)

    @property
    def tick(self) -> float:
        """Return how often ``maintain`` should run: often enough for rotation and for ``interval`` syncs."""
        return min(self._sync_interval, self._max_age / 2)

    # --- the request path -------------------------------------------------------

    def append(self, line: bytes) -> Segment | None:
        """Write one spool line to the active segment; return the segment, or None if the row is in memory only.

        Never raises. One ``write(2)`` (plus an ``fdatasync`` with ``LOG_FSYNC=always``).
        """
        with self._lock:
            if self._closed:
                return None
            if not self._spool.reserve(len(line)):
                self._not_written_locked(None, "the spool directory is at LOG_SPOOL_MAX_BYTES")
                return None
            segment = self._active
            if segment is None and (segment := self._open_locked()) is None:
                self._unjournaled += 1
                return None
            try:
                written = os.write(segment.fd, line)
            except OSError as ex:
                self._not_written_locked(segment, f"write failed: {ex}")
                return None
            if written != len(line):
                self._not_written_locked(segment, f"short write ({written} of {len(line)} bytes)")
                return None
            segment.bytes += written
            segment.unresolved += 1
            if self._sync_each:
                self._sync_fd(segment.fd, segment.path)
            return segment

    def _open_locked(self) -> Segment | None:
        now = self._clock()
        if self._retry_at is not None and now < self._retry_at:
            return None
        self._seq += 1
        try:
            fd, path = create_locked(self.directory, os.getpid(), self._seq, prefix=WAL_PREFIX)
        except OSError as ex:
            self._retry_at = now + self._retry_interval
            self._log_error("cannot open a request-log write-ahead segment in %s: %s", self.directory, ex)
            return None
        self._retry_at = None
        if self.fsync != "off":
            # NOTE: the new name must survive a power cut too, or a synced segment's rows
            # would be lost with its directory entry.
            self._sync_directory()
        self._active = Segment(fd, path, now)
        return self._active

    def _sync_directory(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as ex:
            self._log_error("cannot open %s to sync it: %s", self.directory, ex)
            return
        try:
            self._sync_fd(fd, self.directory, full=True)
        finally:
            os.close(fd)

    def _not_written_locked(self, segment: Segment | None, reason: str) -> None:
        """Count a row left in memory only; retire a segment whose write failed, cut back to its whole lines."""
        self._unjournaled += 1
        if segment is not None:
            # NOTE: a partial line in the middle of a file would spoil the line after it too.
            with contextlib.suppress(OSError):
                os.ftruncate(segment.fd, segment.bytes)
            self._retire_locked(segment)
            self._retry_at = self._clock() + self._retry_interval
        self._log_error("request-log row not journaled (%s); it is in memory only until written", reason)

    # --- resolving rows ---------------------------------------------------------

    def resolve(self, counts: Mapping[Segment, int], *, keep: bool) -> None:
        """Settle rows of these segments: written (``keep=False``) or left for replay from disk (``keep=True``)."""
        with self._lock:
            for segment, count in counts.items():
                segment.unresolved -= count
                segment.keep = segment.keep or keep

    # --- housekeeping -----------------------------------------------------------

    def maintain(self) -> bool:
        """Rotate, sync, delete or hand over segments; return True if the replayer has new work.

        New work: a segment handed over here, or an unlocked segment of another
        (dead) process not seen before. Called by the housekeeping thread every ``tick``.
        """
        now = self._clock()
        with self._lock:
            if self._closed:
                return False
            active = self._active
            # NOTE: also while the writer lags (a retired segment still has rows in flight):
            # PostgreSQL is slow or going down, and the rows will likely be kept.
            lagging = active is not None and (active.keep or any(s.unresolved > 0 for s in self._retired))
            max_age = max(self._max_age, KEPT_SEGMENT_MAX_AGE_SECONDS) if lagging else self._max_age
            rotate_now, self._rotate_now = self._rotate_now, False
            if active is not None and (
                rotate_now or now - active.opened_at >= max_age or active.bytes >= self._max_bytes
            ):
                self._retire_locked(active)
            done = [segment for segment in self._retired if segment.unresolved <= 0]
            self._retired = [segment for segment in self._retired if segment.unresolved > 0]
            to_sync = self._take_dirty_locked(now)
        for fd in to_sync:
            self._sync_fd(fd, None)
            os.close(fd)
        handed_over = sum(self._finish(segment) for segment in done)
        return handed_over > 0 or self._dead_segments_found(now)

    def rotate_soon(self) -> None:
        """Retire the active segment at the next ``maintain``, whatever its age.

        Called when PostgreSQL is back after an outage: the rows set aside in the
        active segment reach replay now, not when it would have rotated.
        """
        with self._lock:
            self._rotate_now = True

    def _retire_locked(self, segment: Segment) -> None:
        if self._active is segment:
            self._active = None
        self._retired.append(segment)

    def _take_dirty_locked(self, now: float) -> list[int]:
        """Return duplicates of the descriptors to sync now (``interval``): synced outside the lock, then closed."""
        if self.fsync != "interval" or (self._synced_at is not None and now - self._synced_at < self._sync_interval):
            return []
        self._synced_at = now
        fds = []
        for segment in self._open_segments_locked():
            if segment.synced_bytes < segment.bytes:
                segment.synced_bytes = segment.bytes
                # NOTE: a duplicate, so that a segment closed meanwhile cannot close the descriptor being synced.
                fds.append(os.dup(segment.fd))
        return fds

    def _finish(self, segment: Segment) -> bool:
        """Delete a resolved segment, or hand it over to replay if it must be kept; return True if handed over."""
        if segment.keep and segment.bytes:
            if self.fsync != "off":
                self._sync_fd(segment.fd, segment.path)
            os.close(segment.fd)  # NOTE: unlocks it: the file is now a replay file like any other
            with self._lock:
                self._handed_over += 1
            logger.info("request-log: write-ahead segment %s handed over to replay", segment.path.name)
            return True
        # NOTE: unlink before unlocking: a replayer that opened the file meanwhile sees it gone.
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        os.close(segment.fd)
        return False

    def _dead_segments_found(self, now: float) -> bool:
        """Tell whether an unlocked segment (a dead process's) appeared since the last look, at most once a second."""
        if self._scanned_at is not None and now - self._scanned_at < DEAD_SEGMENT_SCAN_SECONDS:
            return False
        self._scanned_at = now
        try:
            found = {path.name for path in unlocked(sorted(self.directory.glob(WAL_GLOB)))}
        except OSError as ex:
            logger.debug("cannot look for dead write-ahead segments in %s: %s", self.directory, ex)
            return False
        new = found - self._announced
        self._announced = found
        if new:
            logger.info("request-log: %d write-ahead segments of stopped workers to replay", len(new))
        return bool(new)

    # --- shutdown and status ----------------------------------------------------

    def close(self) -> int:
        """Delete resolved segments and hand over the rest to replay, at once; return the rows handed over unwritten.

        NOTE: no waiting for PostgreSQL: whatever is not committed by now is on disk.
        Appends after this return None (the caller spools those rows).
        """
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            segments = self._open_segments_locked()
            self._active, self._retired = None, []
            unwritten = sum(max(0, segment.unresolved) for segment in segments)
            for segment in segments:
                segment.keep = segment.keep or segment.unresolved > 0
        for segment in segments:
            self._finish(segment)
        return unwritten

    def live_bytes(self) -> int:
        """Return the bytes of this process's open segments, as the spool's last scan saw them: not a backlog."""
        with self._lock:
            names = {segment.path.name for segment in self._open_segments_locked()}
        return sum(size for name, size in self._spool.segment_bytes().items() if name in names)

    def _open_segments_locked(self) -> list[Segment]:
        return [*self._retired, *([self._active] if self._active is not None else [])]

    def status(self) -> dict[str, Any]:
        """Return the readiness detail: fsync mode, open segments, rows not journaled, segments handed over."""
        with self._lock:
            segments = self._open_segments_locked()
            return {
                "fsync": self.fsync,
                "segments": len(segments),
                "bytes": sum(segment.bytes for segment in segments),
                "unresolved_rows": sum(max(0, segment.unresolved) for segment in segments),
                "unjournaled_rows": self._unjournaled,
                "handed_over_segments": self._handed_over,
            }

    # --- failures -----------------------------------------------------------------

    def _sync_fd(self, fd: int, path: Path | None, *, full: bool = False) -> None:
        try:
            (os.fsync if full else os.fdatasync)(fd)
        except OSError as ex:
            self._log_error("cannot sync request-log write-ahead segment %s: %s", path or self.directory, ex)

    def _log_error(self, message: str, *args: object) -> None:
        """Log at most once per ``error_log_interval``, saying how many such failures were held back."""
        log_throttled(logger, self._errors, message, *args)
