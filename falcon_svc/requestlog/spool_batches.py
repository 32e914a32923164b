"""Read finished spool files and write-ahead segments back as batches of JSON lines, for replay.

A batch holds up to ``batch_size`` lines (or fewer adding up to ``MAX_BATCH_BYTES``)
from as many files as it takes: an outage leaves a segment per process every 10 s,
a few thousand rows each, and one transaction per batch rather than per file is part
of what keeps replay fast (scripts/bench/bench_replay.py ``--files``). A file is
deleted only once the batch holding its last line was written, so no crash can lose
a row of it; a file whose replay stopped (``write`` raised, or the process is
stopping) stays, to be replayed whole next time, and its rows written already are
stored once, because the writer is idempotent (``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, overload

from falcon_svc.requestlog.spool_files import Record, lock_existing

logger = logging.getLogger(__name__)

# NOTE: a replayed batch also ends at this many bytes of lines, whatever its row count:
# with LOG_REQUEST_TEXT on, rows can be large, and a batch is held in memory (twice,
# while it is copied) by a worker that is serving requests.
MAX_BATCH_BYTES = 16 * 2**20
# NOTE: and at this many files: each stays open (and locked) until the batch holding
# its last line is written, and a quiet outage leaves segments of a few rows each, so
# a 10,000-line batch could otherwise hold a thousand descriptors (EMFILE at 1,024,
# and the pass never got past it).
MAX_BATCH_FILES = 128


class SpooledBatch(Sequence[Record]):
    """A batch of spooled JSON lines, from one file or several, decoded into records only when asked.

    NOTE: decoding costs about 9 us a row in Python and building its COPY row about 9
    more, all of it holding the GIL the request threads need; a writer that can take
    the lines as they are (``PostgresWriter``: COPY into a ``json`` column, parsed by
    PostgreSQL) never decodes them, and replays about twice as fast. Every line ends
    with a newline (a torn last line is left out by ``replay_files``), but may still
    be unreadable: whoever stores ``lines`` directly must fail on such a line, and then
    use the records, which skip it (``unreadable`` counts them, ``unreadable_in`` by file).

    ``len`` is the number of lines until the batch is decoded, then the number of
    readable records.
    """

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        # (file, the number of its first line here, how many of its lines), in order.
        self.parts: list[tuple[Path, int, int]] = []
        self.size = 0
        self.unreadable_in: dict[Path, int] = {}
        self._records: list[Record] | None = None

    def add(self, path: Path, first_line: int, lines: list[bytes]) -> None:
        """Append lines of ``path``, the first of them its line number ``first_line``."""
        if lines:
            self.lines += lines
            self.parts.append((path, first_line, len(lines)))
            self.size += sum(map(len, lines))

    @property
    def unreadable(self) -> int:
        """Count the lines decoding skipped (0 until the batch is decoded)."""
        return sum(self.unreadable_in.values())

    @property
    def decoded(self) -> bool:
        """Tell whether the records were asked for (and the lines parsed in Python)."""
        return self._records is not None

    @property
    def records(self) -> list[Record]:
        """Return the readable records, decoding the lines on first use."""
        if self._records is None:
            records = []
            start = 0
            for path, first_line, count in self.parts:
                for number, line in enumerate(self.lines[start : start + count], start=first_line):
                    record = _decode(path, number, line)
                    if record is None:
                        self.unreadable_in[path] = self.unreadable_in.get(path, 0) + 1
                    else:
                        records.append(record)
                start += count
            self._records = records
        return self._records

    def describe(self) -> str:
        """Name the batch's files, for a log line."""
        names = [path.name for path, _first, _count in self.parts]
        return names[0] if len(names) == 1 else f"{len(names)} files ({names[0]} to {names[-1]})"

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


class _ReplayedFile:
    """A spool file being replayed: locked (its open handle) until deleted or given up."""

    __slots__ = ("handle", "lines", "path", "read_whole", "torn", "unreadable")

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path = path
        self.handle = handle
        self.lines = 0  # lines put in batches
        self.unreadable = 0  # of those, lines a decoded batch skipped
        self.torn = 0  # a torn last line: 1 or 0
        self.read_whole = False


class _Batcher:
    """Fill batches from files in turn; write each when full; delete the files whose every line is written."""

    def __init__(
        self, write: Callable[[SpooledBatch], None], batch_size: int, drop: Callable[[int, str], None]
    ) -> None:
        self._write = write
        self._batch_size = batch_size
        self._drop = drop
        self._batch = SpooledBatch()
        self._open: list[_ReplayedFile] = []
        self.replayed = 0

    def read(self, path: Path, handle: BinaryIO, should_stop: Callable[[], bool]) -> bool:
        """Put a locked file's lines in batches, writing those that fill up; False if told to stop meanwhile."""
        file = _ReplayedFile(path, handle)
        self._open.append(file)
        lines: list[bytes] = []
        first_line = 1
        room = self._batch_size - len(self._batch.lines)
        size = self._batch.size
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                # NOTE: only the last line can lack its newline: a crash mid-write.
                logger.warning("skipping truncated last line %d of %s (a crash mid-write)", number, path.name)
                file.torn = 1
                break
            lines.append(line)
            size += len(line)
            if len(lines) >= room or size >= MAX_BATCH_BYTES:
                self._take(file, first_line, lines)
                self.flush()
                if should_stop():
                    return False
                first_line, lines, room, size = number + 1, [], self._batch_size, 0
        self._take(file, first_line, lines)
        file.read_whole = True
        return True

    def make_room(self) -> None:
        """Write the batch now if it holds ``MAX_BATCH_FILES`` files, before another is opened."""
        if len(self._open) >= MAX_BATCH_FILES:
            self.flush()

    def _take(self, file: _ReplayedFile, first_line: int, lines: list[bytes]) -> None:
        self._batch.add(file.path, first_line, lines)
        file.lines += len(lines)

    def flush(self) -> None:
        """Write the batch (raising what ``write`` raises), then delete the files it completed."""
        batch, self._batch = self._batch, SpooledBatch()
        if batch.lines:
            self._write(batch)
            self.replayed += len(batch)
            for file in self._open:
                file.unreadable += batch.unreadable_in.get(file.path, 0)
        done = [file for file in self._open if file.read_whole]
        self._open = [file for file in self._open if not file.read_whole]
        for file in done:
            file.path.unlink(missing_ok=True)
            file.handle.close()  # NOTE: releases the lock, after the unlink
            if file.unreadable + file.torn:
                self._drop(file.unreadable + file.torn, f"unreadable lines in {file.path.name}")
            logger.info("replayed %d request-log rows from %s", file.lines - file.unreadable, file.path.name)

    def release(self) -> None:
        """Give up the files still open (a write failed, or a stop): unlocked, kept for the next replay."""
        for file in self._open:
            file.handle.close()
        self._open = []


def replay_files(
    paths: Iterable[Path],
    write: Callable[[SpooledBatch], None],
    *,
    batch_size: int,
    should_stop: Callable[[], bool],
    drop: Callable[[int, str], None],
) -> int:
    """Feed finished spool files to ``write`` in batches, deleting each once its rows are written; return rows written.

    A file another process holds is skipped. Unreadable lines are skipped and
    reported to ``drop(count, reason)``. ``should_stop`` is asked between batches
    and between files; an exception from ``write`` stops the replay and propagates.
    """
    batcher = _Batcher(write, batch_size, drop)
    try:
        for path in paths:
            if should_stop():
                return batcher.replayed
            batcher.make_room()
            fd = lock_existing(path)
            if fd is None:
                continue
            if not batcher.read(path, os.fdopen(fd, "rb"), should_stop):
                return batcher.replayed
        batcher.flush()
    finally:
        batcher.release()
    return batcher.replayed


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
