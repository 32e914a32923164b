"""The spool's files: their names and locks, and the JSON lines written to them and read back.

Each process appends to a file of its own, ``spool-<time_ns>-<pid>-<seq>.jsonl``,
and holds an exclusive ``flock`` on it while it is active. A file nobody holds
a lock on is finished: sealed by its owner, or left by a worker that died or was
restarted. Replay locks a finished file too, so two processes never replay the
same file at once, and deletes it only once all its rows are written. A crash
mid-write leaves a truncated last line, which replay skips and logs.

The write-ahead log (``wal``) keeps its segments here too, as
``wal-<time_ns>-<pid>-<seq>.jsonl``: the same lines, the same locks. Its owner
deletes a segment whose rows are all written; one it hands over, or one left
unlocked by a process that died, is replayed like any finished spool file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

logger = logging.getLogger(__name__)

SPOOL_PREFIX = "spool-"
SPOOL_GLOB = f"{SPOOL_PREFIX}*.jsonl"
WAL_PREFIX = "wal-"
WAL_GLOB = f"{WAL_PREFIX}*.jsonl"
# NOTE: rows PostgreSQL rejects for their content are set aside here for an
# operator, never replayed (they would fail again), but still count towards the
# bound; ``remove_rejected`` deletes them after their retention.
REJECTED_PREFIX = "rejected-"
REJECTED_GLOB = f"{REJECTED_PREFIX}*.jsonl"
# NOTE: a new file is created under this prefix, locked, then renamed into place,
# so no replayer can ever see (and delete) an active file before it is locked.
_NEW_PREFIX = ".new-"
# NOTE: a replayed batch also ends at this many bytes of lines, whatever its row count:
# with LOG_REQUEST_TEXT on, rows can be large, and a batch is held in memory (twice,
# while it is copied) by a worker that is serving requests.
MAX_BATCH_BYTES = 16 * 2**20

Record = dict[str, Any]


def encode(record: Mapping[str, Any]) -> bytes:
    """Return ``record`` as one JSON line, ASCII only; raise TypeError or ValueError if it cannot be."""
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def create_locked(directory: Path, pid: int, seq: int, prefix: str = SPOOL_PREFIX) -> tuple[int, Path]:
    """Create a new spool file (or write-ahead segment: ``prefix``), locked by this process; return its fd and path."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}{time.time_ns():020d}-{pid}-{seq:06d}.jsonl"
    new_path = directory / f"{_NEW_PREFIX}{name}"
    fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(new_path, directory / name)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            new_path.unlink()
        raise
    return fd, directory / name


def finish(fd: int, path: Path | None) -> None:
    """Sync and close a detached spool file (deleting it if empty); closing releases its lock."""
    try:
        if os.fstat(fd).st_size == 0 and path is not None:
            path.unlink(missing_ok=True)
        else:
            os.fsync(fd)
    except OSError as ex:
        logger.error("request-log spool file %s could not be synced: %s", path, ex)
    finally:
        os.close(fd)


class SpooledBatch(Sequence[Record]):
    """A batch of spooled JSON lines, decoded into records only when someone asks for them.

    NOTE: decoding costs about 9 us a row in Python and building its COPY row about 9
    more, all of it holding the GIL the request threads need; a writer that can take
    the lines as they are (``PostgresWriter``: COPY into a ``json`` column, parsed by
    PostgreSQL) never decodes them, and replays about twice as fast. Every
    line ends with a newline (a torn last line is left out by ``replay_file``), but
    may still be unreadable: whoever stores ``lines`` directly must fail on such a
    line, and then use the records, which skip it (``unreadable`` counts them).

    ``len`` is the number of lines until the batch is decoded, then the number of
    readable records.
    """

    def __init__(self, path: Path, first_line: int, lines: list[bytes]) -> None:
        self.path = path
        self.first_line = first_line
        self.lines = lines
        self.unreadable = 0
        self._records: list[Record] | None = None

    @property
    def decoded(self) -> bool:
        """Tell whether the records were asked for (and the lines parsed in Python)."""
        return self._records is not None

    @property
    def records(self) -> list[Record]:
        """Return the readable records, decoding the lines on first use."""
        if self._records is None:
            records = []
            for number, line in enumerate(self.lines, start=self.first_line):
                record = _decode(self.path, number, line)
                if record is None:
                    self.unreadable += 1
                else:
                    records.append(record)
            self._records = records
        return self._records

    def __len__(self) -> int:
        return len(self.lines) if self._records is None else len(self._records)

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...
    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


def replay_file(
    path: Path,
    write: Callable[[SpooledBatch], None],
    *,
    batch_size: int,
    should_stop: Callable[[], bool],
    drop: Callable[[int, str], None],
) -> int:
    """Feed one finished spool file to ``write`` in batches, then delete it; return the rows written.

    A batch holds ``batch_size`` lines, or fewer adding up to ``MAX_BATCH_BYTES``.

    A file another process holds is skipped (0). Unreadable lines are skipped and
    reported to ``drop(count, reason)``. When ``should_stop`` says so between
    batches, or ``write`` raises, the file stays, to be replayed whole next time:
    the batches written already are written again, and stored once, because the
    writer is idempotent (``ON CONFLICT DO NOTHING``); the file is deleted only
    after its last batch was written, so no crash can lose a row of it.
    """
    fd = _lock_existing(path)
    if fd is None:
        return 0
    replayed = 0
    bad_lines = 0
    with os.fdopen(fd, "rb") as handle:  # NOTE: closing releases the lock, after the unlink
        lines: list[bytes] = []
        size = 0
        first_line = 1
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                # NOTE: only the last line can lack its newline: a crash mid-write.
                logger.warning("skipping truncated last line %d of %s (a crash mid-write)", number, path.name)
                bad_lines += 1
                break
            lines.append(line)
            size += len(line)
            if len(lines) >= batch_size or size >= MAX_BATCH_BYTES:
                replayed, bad_lines = _write_batch(write, SpooledBatch(path, first_line, lines), replayed, bad_lines)
                first_line, lines, size = number + 1, [], 0
                if should_stop():
                    return replayed
        if lines:
            replayed, bad_lines = _write_batch(write, SpooledBatch(path, first_line, lines), replayed, bad_lines)
        path.unlink(missing_ok=True)
    if bad_lines:
        drop(bad_lines, f"unreadable lines in {path.name}")
    logger.info("replayed %d request-log rows from %s", replayed, path.name)
    return replayed


def _write_batch(
    write: Callable[[SpooledBatch], None], batch: SpooledBatch, replayed: int, bad_lines: int
) -> tuple[int, int]:
    """Write one batch; return the running totals of rows written and unreadable lines."""
    write(batch)
    return replayed + len(batch), bad_lines + batch.unreadable


def replayable_files(directory: Path) -> list[Path]:
    """Return the spool files and write-ahead segments in ``directory``, oldest first (locked ones too)."""
    paths = [*directory.glob(SPOOL_GLOB), *directory.glob(WAL_GLOB)]
    # NOTE: both names go on with <time_ns>-<pid>-<seq>: order by that, not by the prefix.
    return sorted(paths, key=lambda path: path.name.partition("-")[2])


def unlocked(paths: list[Path]) -> list[Path]:
    """Return those of ``paths`` no process holds a lock on (a dead worker's, or handed over for replay).

    NOTE: the probe takes a shared lock for an instant; a replayer trying that very
    file then skips it until its next pass, which the caller triggers anyway.
    """
    found = []
    for path in paths:
        fd = _lock_existing(path, fcntl.LOCK_SH)
        if fd is not None:
            os.close(fd)
            found.append(path)
    return found


def remove_abandoned_new_files(directory: Path) -> None:
    """Delete ``.new-`` files left by a crash between create and rename (always empty)."""
    for path in directory.glob(f"{_NEW_PREFIX}*.jsonl"):
        fd = _lock_existing(path)
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)


def write_rejected(directory: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``records`` to a new, synced ``rejected-`` file and return its path; raise OSError if it cannot be."""
    path = directory / f"{REJECTED_PREFIX}{time.time_ns():020d}-{os.getpid()}.jsonl"
    data = b"".join(encode(record) for record in records)
    try:
        with path.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        # NOTE: a half-written file would be kept for days as if it held every row.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise
    return path


def remove_rejected(directory: Path, *, modified_before: float, keep_bytes: int) -> list[tuple[str, int]]:
    """Delete ``rejected-`` files last modified before ``modified_before`` (Unix time), then the oldest until at
    most ``keep_bytes`` remain; return the name and size of each file deleted.

    A file that cannot be deleted is logged and kept; one another worker deleted first is not counted.
    """
    found = []
    for path in directory.glob(REJECTED_GLOB):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            found.append((stat.st_mtime, path.name, stat.st_size))
    found.sort()  # oldest first
    kept = sum(size for _mtime, _name, size in found)
    removed = []
    for mtime, name, size in found:
        if mtime >= modified_before and kept <= keep_bytes:
            break
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            kept -= size
            continue
        except OSError as ex:
            logger.error("cannot delete rejected request-log rows %s: %s", name, ex)
            continue
        kept -= size
        removed.append((name, size))
    return removed


def _lock_existing(path: Path, mode: int = fcntl.LOCK_EX) -> int | None:
    """Open and lock ``path`` (exclusively unless told) without waiting; None if it is held or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        # NOTE: another replayer may have deleted the file between our open and
        # our lock; then we hold a lock on an orphan inode and must not replay it.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(path)
    except OSError:
        os.close(fd)
        return None
    return fd


def _decode(path: Path, number: int, line: bytes) -> Record | None:
    if not line.endswith(b"\n"):
        logger.warning("skipping truncated last line %d of %s (a crash mid-write)", number, path.name)
        return None
    try:
        record = json.loads(line)
    except ValueError:
        logger.error("skipping unreadable line %d of %s", number, path.name)
        return None
    if not isinstance(record, dict):
        logger.error("skipping line %d of %s: not a JSON object", number, path.name)
        return None
    return record
