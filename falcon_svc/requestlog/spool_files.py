"""The spool's files: their names and locks, and the JSON lines written to them (``spool_batches`` reads them back).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
# A creator renames its ``.new-`` file within microseconds; one this old was abandoned.
ABANDONED_AFTER_SECONDS = 60.0
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
        fd = lock_existing(path, fcntl.LOCK_SH)
        if fd is not None:
            os.close(fd)
            found.append(path)
    return found


def remove_abandoned_new_files(directory: Path, *, now: float | None = None) -> None:
    """Delete ``.new-`` files left by a crash between create and rename (always empty).

    Only those older than ``ABANDONED_AFTER_SECONDS``: a ``.new-`` file is unlocked
    between its creation and its creator's ``flock``, and deleting it then made
    ``create_locked`` fail in a worker starting up while another replayed, whose
    rows went unjournaled until it tried again (99 lost to a SIGKILL in CI).
    """
    cutoff = (time.time() if now is None else now) - ABANDONED_AFTER_SECONDS
    for path in directory.glob(f"{_NEW_PREFIX}*.jsonl"):
        try:
            if path.stat().st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        fd = lock_existing(path)
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


def lock_existing(path: Path, mode: int = fcntl.LOCK_EX) -> int | None:
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
