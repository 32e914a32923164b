"""Fakes and helpers for the request log's unit tests: a writer in memory, a spool that signals.

``FakeWriter`` stands in for ``PostgresWriter`` behind the queue's ``Writer`` seam:
it stores batches in a list, fails on demand (an outage, a refused row), and can
hold a write until the test releases it (a writer stuck in PostgreSQL). Tests
wait on its condition, never on the clock.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from falcon_svc.requestlog import LogRow, RequestLog, Spool, WriteAheadLog
from falcon_svc.requestlog.spool_files import SPOOL_GLOB, WAL_GLOB, replayable_files, unlocked
from falcon_svc.resilience import CircuitBreaker, RetryPolicy

# Long enough that a thread waiting it out fails the test's wait, which only a bug makes it do.
FOREVER = 3600.0
WAIT = 10.0
POLICY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


class TransientError(ConnectionError):
    """The fake's outage: a refused or lost connection."""


class PoisonError(ValueError):
    """The fake's refusal of a row's content (PostgreSQL's DataError, IntegrityError)."""


@dataclass(frozen=True)
class Call:
    """One attempt the queue made: which operation, which rows, how long it allowed for a connection."""

    operation: str
    log_ids: list[str]
    wait: float | None


class FakeWriter:
    """An in-memory database for ``RequestLog``: records every attempt, stores what succeeds."""

    transient_errors = (TransientError,)
    poison_errors = (PoisonError,)

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.stored: list[list[str]] = []  # the log_ids of each successful write, in order
        self.probes = 0
        self.warm_ups = 0
        self.answers_warm_up = True
        self.opened = self.closed = False
        self.failing: BaseException | None = None  # every write and probe raises it while set
        self.script: deque[BaseException | None] = deque()  # the next attempts' outcomes, before `failing`
        self.refused_ids: set[str] = set()  # rows refused for their content, alone or in a batch
        self._held: threading.Event | None = None
        self.entered = threading.Event()  # a write reached the hold
        self._changed = threading.Condition()

    # --- the Writer interface -------------------------------------------------

    def open(self) -> None:
        self.opened = True

    def write(self, records: Sequence[Mapping[str, Any]], *, operation: str, wait: float | None = None) -> None:
        ids = [record["log_id"] for record in records]
        with self._changed:
            self.calls.append(Call(operation, ids, wait))
            self._changed.notify_all()
            held = self._held
        if held is not None:
            self.entered.set()
            assert held.wait(WAIT * 3), "the test never released the held write"
        error = self._outcome()
        if error is not None:
            raise error
        if self.refused_ids.intersection(ids):
            raise PoisonError(f"refused {sorted(self.refused_ids.intersection(ids))}")
        with self._changed:
            self.stored.append(ids)
            self._changed.notify_all()

    def probe(self) -> None:
        with self._changed:
            self.probes += 1
            self._changed.notify_all()
        error = self._outcome()
        if error is not None:
            raise error

    def warm_up(self) -> bool:
        # NOTE: counted, but it takes no scripted outcome (the tests script the writes):
        # the pass goes ahead and meets whatever the writes are to meet.
        with self._changed:
            self.warm_ups += 1
            self._changed.notify_all()
        return self.answers_warm_up

    def close(self, timeout: float = 1.0) -> None:
        self.closed = True
        self.close_timeout = timeout

    # --- for the tests ----------------------------------------------------------

    @contextmanager
    def holding(self) -> Iterator[threading.Event]:
        """Hold every write until the yielded event is set (set at the latest on exit)."""
        release = threading.Event()
        self._held = release
        try:
            yield release
        finally:
            self._held = None
            release.set()

    def wait_until(self, predicate: Callable[[FakeWriter], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self), WAIT), f"timed out waiting until {what}"

    def stored_ids(self) -> list[str]:
        return [log_id for batch in self.stored for log_id in batch]

    def _outcome(self) -> BaseException | None:
        with self._changed:
            return self.script.popleft() if self.script else self.failing


class SignallingSpool(Spool):
    """A real spool that tells the test what the writer and the replayer do with it.

    The replayer starts each pass with ``size_bytes(refresh=True)`` and ``replay``
    makes one more such call, so once ``refreshes`` has grown by 4 since a moment,
    a whole pass has started and finished after that moment.
    """

    def __init__(self, directory: Path, max_bytes: int = 10**7) -> None:
        super().__init__(directory, max_bytes=max_bytes, refresh_interval=0)
        self.batches: list[list[str]] = []
        self.appended = threading.Event()
        self.replays = 0
        self._refreshes = 0
        self._changed = threading.Condition()

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        stored = super().append(records)
        self.batches.append([record["log_id"] for record in records])
        self.appended.set()
        return stored

    def replay(self, *args: Any, **kwargs: Any) -> int:
        self.replays += 1
        return super().replay(*args, **kwargs)

    def size_bytes(self, *, refresh: bool = False) -> int:
        size = super().size_bytes(refresh=refresh)
        if refresh:
            with self._changed:
                self._refreshes += 1
                self._changed.notify_all()
        return size

    def wait_for_a_whole_pass(self) -> None:
        """Return once a replayer pass has started and finished since the call."""
        with self._changed:
            target = self._refreshes + 4
            assert self._changed.wait_for(lambda: self._refreshes >= target, WAIT), "the replayer stopped"

    def start_after_the_first_replay_pass(self, log: RequestLog) -> None:
        """Start ``log`` and return once its replayer has looked at this (empty) spool.

        With nothing to replay (an empty spool, or only the log's own write-ahead
        segments) the replayer's pass is one ``size_bytes(refresh=True)``; then it
        sleeps for its interval, so it cannot race a test's own spooling.
        """
        assert unlocked(replayable_files(self.directory)) == [], "the replayer would replay this spool at start"
        self.size_bytes(refresh=True)
        with self._changed:
            target = self._refreshes + 1
        log.start()
        with self._changed:
            assert self._changed.wait_for(lambda: self._refreshes >= target, WAIT), "the replayer never started"


class FakeClock:
    """A clock that stands still until the test moves it, and counts how often it was read."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0
        self._read = threading.Condition()

    def __call__(self) -> float:
        with self._read:
            self.reads += 1
            self._read.notify_all()
        return self.now

    def wait_for_reads(self, count: int) -> None:
        with self._read:
            assert self._read.wait_for(lambda: self.reads >= count, WAIT), f"the clock was read {self.reads} times"


def make_row(i: int, text: str | None = None) -> LogRow:
    return LogRow(
        log_id=f"log-{i}",
        request_id=f"req-{i}",
        received_at=1.0,
        route="/v1/infer",
        method="POST",
        status=200,
        worker_id="test:1",
        model_version="v1",
        label="positive",
        confidence=0.9,
        n_texts=1,
        cache_hit=False,
        idempotent_replay=False,
        latency_ms=1.2,
        text_length=5,
        text_hmac="0" * 64,
        text=text,
    )


def make_log(writer: FakeWriter, spool: Spool, breaker: CircuitBreaker | None = None, **overrides: Any) -> RequestLog:
    """A request log over the fake writer: no backoff sleeps, no flush or replay timer unless asked.

    NOTE: no write-ahead log unless ``wal=`` is given (the path of a row the log could
    not take), and close() flushes for as long as its timeout (production: 0.05 s at most),
    so that a slow moment of this machine cannot turn a flush into a spooling.
    """
    params: dict[str, Any] = {
        "buffer_max": 100,
        "batch_size": 3,
        "flush_interval": FOREVER,
        "replay_interval": FOREVER,
        "close_flush_seconds": FOREVER,
        "sleep": lambda _delay: None,
    }
    params.update(overrides)
    return RequestLog(writer, spool, breaker or CircuitBreaker("postgres", failure_threshold=100), POLICY, **params)


def open_breaker() -> CircuitBreaker:
    breaker = CircuitBreaker("postgres", failure_threshold=1, reset_timeout=FOREVER)
    breaker.record_failure()
    return breaker


def records_on_disk(directory: Path) -> list[dict[str, Any]]:
    """Read every spooled record as it is on disk, oldest file first, without replaying (or unlocking) anything."""
    return [json.loads(line) for path in sorted(directory.glob(SPOOL_GLOB)) for line in path.read_bytes().splitlines()]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rows_total(outcome: str) -> float:
    return sample("falcon_request_log_rows_total", outcome=outcome)


# --- the write-ahead log ---------------------------------------------------------


def make_wal(spool: Spool, **overrides: Any) -> WriteAheadLog:
    """A write-ahead log that rotates and scans only when the test says so (its clock stands still)."""
    params: dict[str, Any] = {"max_age": 60.0, "sync_interval": FOREVER, "clock": FakeClock()}
    params.update(overrides)
    return WriteAheadLog(spool, **params)


def segments(directory: Path) -> list[Path]:
    """Return the write-ahead segments in ``directory``, oldest first."""
    return sorted(directory.glob(WAL_GLOB))


def segment_ids(directory: Path) -> list[str]:
    """Return the log_id of every whole line of every segment, oldest first."""
    return [
        json.loads(line)["log_id"]
        for path in segments(directory)
        for line in path.read_bytes().splitlines(keepends=True)
        if line.endswith(b"\n")
    ]


def offered_ids(writer: FakeWriter) -> list[str]:
    """Return every log_id the writer was asked to store, successful or not, in order."""
    return [log_id for call in writer.calls for log_id in call.log_ids]
