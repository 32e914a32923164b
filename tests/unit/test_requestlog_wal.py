"""The request log's write-ahead file: every row on disk before submit returns, shipped once, whatever dies.

A dying worker is a real process (``DYING_WORKER``) SIGKILLed with its rows
journaled but never shipped; a full disk is a real ENOSPC (``/dev/full`` put
under the segment's descriptor). The fake writer records every log_id it is
offered: PostgreSQL's ``ON CONFLICT`` against re-sent rows is tested with a real
server in tests/integration/test_requestlog_sigkill.py.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from requestlog_fakes import (
    FOREVER,
    WAIT,
    FakeClock,
    FakeWriter,
    SignallingSpool,
    TransientError,
    make_log,
    make_row,
    make_wal,
    offered_ids,
    open_breaker,
    records_on_disk,
    rows_total,
    segment_ids,
    segments,
)

from falcon_svc.requestlog import RequestLog, Spool, WriteAheadLog
from falcon_svc.requestlog.rows import COLUMNS, encode_row, row_record
from falcon_svc.requestlog.spool_files import encode, unlocked
from falcon_svc.requestlog.wal import FSYNC_MODES, KEPT_SEGMENT_MAX_AGE_SECONDS
from falcon_svc.settings import LOG_FSYNC_MODES

REPO_ROOT = Path(__file__).resolve().parents[2]
WAL_LOGGER = "falcon_svc.requestlog.wal"

# Past a segment's max_age (make_wal: 60 s of its FakeClock): the next maintain() rotates it.
ROTATED = 60.0

# A worker that journals rows and dies before shipping any: its writer is never started.
DYING_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from requestlog_fakes import POLICY, FakeWriter, make_row
    from falcon_svc.requestlog import RequestLog, Spool, WriteAheadLog
    from falcon_svc.resilience import CircuitBreaker

    directory, first, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    spool = Spool(directory, 10**7)
    log = RequestLog(FakeWriter(), spool, CircuitBreaker("postgres"), POLICY, wal=WriteAheadLog(spool))
    for i in range(first, first + count):
        log.submit(make_row(i))
    print("ready", flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


class DyingWorker:
    """Another worker process with ``count`` rows journaled and none shipped, until ``kill()``."""

    def __init__(self, directory: Path, first: int, count: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", DYING_WORKER, str(directory), str(first), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == b"ready", (
            "the other worker did not start"
        )

    def kill(self) -> None:
        """Let it SIGKILL itself (after its last append), and wait for it."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()
        assert self.process.wait(timeout=WAIT) == -signal.SIGKILL, "the other worker did not die by SIGKILL"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT)


@pytest.fixture
def writer() -> FakeWriter:
    return FakeWriter()


@pytest.fixture
def others() -> Iterator[list[DyingWorker]]:
    started: list[DyingWorker] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def spool(tmp_path: Path) -> SignallingSpool:
    return SignallingSpool(tmp_path / "spool")


Journaled = Callable[..., tuple[RequestLog, WriteAheadLog]]


@pytest.fixture
def journaled(writer: FakeWriter, spool: SignallingSpool) -> Iterator[Journaled]:
    """Make request logs with a write-ahead log (the test's writer and spool unless given), closed after the test."""
    made: list[RequestLog] = []

    def make(**overrides: Any) -> tuple[RequestLog, WriteAheadLog]:
        log_spool = overrides.pop("spool", spool)
        wal = overrides.pop("wal", None) or make_wal(log_spool)
        made.append(make_log(overrides.pop("writer", writer), log_spool, wal=wal, **overrides))
        return made[-1], wal

    yield make
    for log in made:
        log.close(timeout=0.5)


def dead_worker_rows(spool: Spool, others: list[DyingWorker], first: int, count: int) -> list[str]:
    """Leave the segment of a worker SIGKILLed between append and ship; return its rows' log_ids."""
    worker = DyingWorker(spool.directory, first, count)
    others.append(worker)
    worker.kill()
    return [f"log-{i}" for i in range(first, first + count)]


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (bounded): for what the threads do after the fake writer has returned."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def settled(log: RequestLog) -> dict:
    """Wait until no journaled row waits for its fate (written or set aside); return the log's ``wal`` detail."""
    wait_until(
        lambda: log.status()["queue_depth"] == 0 and log.status()["wal"]["unresolved_rows"] == 0,
        "every row is written or set aside",
    )
    return log.status()["wal"]


def disk_full_under(segment: Path) -> int:
    """Make every write to ``segment``'s open descriptor fail with ENOSPC (``/dev/full`` under it), as on a full disk.

    Returns another descriptor holding the segment's lock, which swapping the
    descriptor released: the test closes it at its end.
    """
    appending = fd_of(segment)
    lock = os.open(segment, os.O_RDONLY)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, appending)
    os.close(full)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def fd_of(path: Path) -> int:
    """Return this process's descriptor open on ``path`` (found in /proc, not in the log's internals)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                return int(name)
        except FileNotFoundError:
            continue
    raise AssertionError(f"no descriptor open on {path}")


# --- the line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"text": 'tab\there "quoted" \\ back, é ü 中, emoji 😀, lone \udc80, nul \x00'},
        {"route": None, "label": None, "confidence": None, "cache_hit": None, "client_key_id": "key-1"},
        {"confidence": 1e-300, "latency_ms": 123456789.125, "received_at": 1764633600.123456, "n_texts": 10**12},
        {"confidence": float("nan")},
        {"latency_ms": float("inf")},
        {"cache_hit": True, "idempotent_replay": True, "status": 422},
        {"status": True, "n_texts": 2.0, "confidence": 1, "cache_hit": 1},  # not their columns' types
    ],
    ids=["plain", "awkward-text", "nulls", "numbers", "nan", "inf", "booleans", "odd-types"],
)
def test_the_journaled_line_is_the_spool_line(changes):
    row = make_row(1)
    for name, value in changes.items():
        setattr(row, name, value)
    assert encode_row(row) == encode(row_record(row)), "replay reads segments as spool files: same bytes"


def test_a_value_json_cannot_encode_is_refused_as_the_spool_refuses_it():
    row = make_row(1)
    row.label = object()  # type: ignore[assignment]
    with pytest.raises(TypeError):
        encode_row(row)


def test_the_journaled_line_has_every_column_of_the_row_in_order():
    assert list(json.loads(encode_row(make_row(1)))) == list(COLUMNS), "a LogRow column is missing from encode_row"


# --- append before ship ---------------------------------------------------------------


def test_submit_puts_the_row_on_disk_before_it_returns(journaled, writer, spool):
    log, _wal = journaled()  # never started: nothing ships
    log.submit(make_row(1))
    assert segment_ids(spool.directory) == ["log-1"], "the row must be in a segment once submit returns"
    assert log.status()["queue_depth"] == 1, "and queued, to be shipped from memory"
    assert records_on_disk(spool.directory) == [], "a journaled row is not written to the spool as well"


def test_a_crash_between_append_and_ship_loses_nothing_and_replay_ships_each_row_once(journaled, writer, spool, others):
    dead = dead_worker_rows(spool, others, 0, 25)
    assert segment_ids(spool.directory) == dead, "the dead worker's rows are on disk"
    log, _wal = journaled()
    log.start()  # its replayer's first pass runs at once
    writer.wait_until(lambda w: sorted(w.stored_ids()) == sorted(dead), "the dead worker's rows are replayed")
    wait_until(lambda: segments(spool.directory) == [], "the replayed segment is deleted")
    log._replayer.replay_once()
    assert Counter(offered_ids(writer)) == Counter(dead), "each row shipped exactly once"


def test_a_live_worker_s_segment_is_never_taken_over(journaled, writer, spool, others):
    alive = DyingWorker(spool.directory, 100, 3)
    others.append(alive)
    log, wal = journaled()
    log.submit(make_row(1))  # and a segment of its own
    log._replayer.replay_once()
    assert wal.maintain() is False, "a live worker's segment is no work for the replayer"
    assert writer.calls == [], "rows of live segments were replayed: their workers ship them"
    assert sorted(segment_ids(spool.directory)) == ["log-1", "log-100", "log-101", "log-102"]
    alive.kill()
    wal._clock.now += ROTATED  # type: ignore[attr-defined]  # the next look for dead segments is due
    assert wal.maintain() is True, "a dead worker's segment is work for the replayer"
    log._replayer.replay_once()
    assert offered_ids(writer) == ["log-100", "log-101", "log-102"], "only the dead worker's rows are replayed"


def test_a_dead_worker_s_segment_wakes_the_replayer_of_a_live_one(journaled, writer, spool, others):
    """Replay starts within a housekeeping scan of the death, not after the replay interval (FOREVER here)."""
    log, _wal = journaled(wal=make_wal(spool, clock=time.monotonic, sync_interval=0.05))
    spool.start_after_the_first_replay_pass(log)
    dead = dead_worker_rows(spool, others, 200, 5)
    writer.wait_until(lambda w: sorted(w.stored_ids()) == dead, "the dead worker's segment is replayed promptly")


def test_a_torn_last_line_is_skipped_and_logged_and_the_rest_is_shipped(journaled, writer, spool, others, caplog):
    dead = dead_worker_rows(spool, others, 0, 4)
    (segment,) = segments(spool.directory)
    with segment.open("ab") as handle:
        handle.write(encode_row(make_row(4))[:37])  # a write cut short by the crash
    dropped = rows_total("dropped")
    log, _wal = journaled()
    with caplog.at_level(logging.WARNING, logger="falcon_svc.requestlog"):
        log._replayer.replay_once()
    assert Counter(offered_ids(writer)) == Counter(dead), "every whole line is shipped, once"
    assert any("truncated last line 5" in record.getMessage() for record in caplog.records), caplog.text
    assert rows_total("dropped") - dropped == 1, "the torn row is counted as lost"
    assert segments(spool.directory) == []


def test_replaying_twice_ships_nothing_twice(journaled, spool, others):
    """Two live workers' replayers race for one dead segment: its rows are offered once in all."""
    dead = dead_worker_rows(spool, others, 0, 30)
    first, second = FakeWriter(), FakeWriter()
    log_a, _ = journaled(writer=first, replay_batch_size=7)
    log_b, _ = journaled(writer=second, replay_batch_size=7)
    racers = [threading.Thread(target=log._replayer.replay_once) for log in (log_a, log_b)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(WAIT)
    log_a._replayer.replay_once()
    log_b._replayer.replay_once()
    assert Counter(offered_ids(first) + offered_ids(second)) == Counter(dead), "a row was replayed twice"
    assert segments(spool.directory) == []


def test_a_replay_interrupted_mid_segment_resends_it_whole_and_the_rows_are_stored_once(
    journaled, writer, spool, others
):
    dead = dead_worker_rows(spool, others, 0, 10)
    log, _wal = journaled(replay_batch_size=4)
    writer.script.extend([None, TransientError("connection lost")] + [TransientError("connection lost")] * 2)
    log._replayer.replay_once()  # the first batch commits, the second fails: the segment stays
    assert segment_ids(spool.directory) == dead, "an interrupted segment must stay whole"
    log._replayer.replay_once()
    assert set(writer.stored_ids()) == set(dead)
    assert Counter(writer.stored_ids()) == Counter(dead) + Counter(dead[:4]), (
        "only the batch committed before the failure is sent again (ON CONFLICT stores it once)"
    )
    assert segments(spool.directory) == []


# --- the fast path and its segments -------------------------------------------------------


def test_a_segment_whose_rows_are_written_is_deleted_after_rotation(journaled, writer, spool):
    clock = FakeClock()
    log, wal = journaled(wal=make_wal(spool, clock=clock))
    spool.start_after_the_first_replay_pass(log)
    for i in range(3):
        log.submit(make_row(i))
    writer.wait_until(lambda w: len(w.stored_ids()) == 3, "the batch is written from memory")
    settled(log)
    wal.maintain()
    assert len(segments(spool.directory)) == 1, "the active segment stays until it is rotated"
    clock.now += ROTATED
    assert wal.maintain() is False, "nothing for the replayer"
    assert segments(spool.directory) == [], "a rotated segment whose rows are all written is deleted"
    log.submit(make_row(3))
    assert segment_ids(spool.directory) == ["log-3"], "the next row starts a new segment"
    assert offered_ids(writer) == ["log-0", "log-1", "log-2"], "written rows are never replayed"


def test_a_failed_batch_is_left_in_its_segment_not_written_again_and_replayed(journaled, writer, spool):
    clock = FakeClock()
    writer.failing = TransientError("connection refused")
    log, wal = journaled(wal=make_wal(spool, clock=clock))
    spool.start_after_the_first_replay_pass(log)
    spooled = rows_total("spooled")
    for i in range(3):
        log.submit(make_row(i))
    writer.wait_until(lambda w: len(w.calls) == 3, "the batch is tried 3 times")
    settled(log)
    assert rows_total("spooled") - spooled == 3, "rows left for replay are counted as spooled"
    assert spool.batches == [] and records_on_disk(spool.directory) == [], "the rows are not written a second time"
    clock.now += ROTATED
    assert wal.maintain() is True, "a segment handed over is work for the replayer"
    assert wal.status()["handed_over_segments"] == 1
    writer.failing = None
    log._replayer.replay_once()
    assert writer.stored_ids() == ["log-0", "log-1", "log-2"]
    assert segments(spool.directory) == []


def test_rows_that_find_the_queue_full_stay_in_their_segment(journaled, writer, spool):
    log, wal = journaled(buffer_max=2)  # never started
    for i in range(5):
        log.submit(make_row(i))
    assert log.status()["queue_depth"] == 2
    assert spool.batches == [], "the rows past the queue bound are on disk already: no second write"
    assert wal.status()["unresolved_rows"] == 2, "only the queued rows wait for their fate"
    log.close(timeout=0.5)
    assert segment_ids(spool.directory) == [f"log-{i}" for i in range(5)], "close hands the segment over"
    assert writer.calls == []


def test_an_open_breaker_leaves_batches_in_their_segment(journaled, writer, spool):
    log, _wal = journaled(breaker=open_breaker())
    spool.start_after_the_first_replay_pass(log)
    for i in range(3):
        log.submit(make_row(i))
    settled(log)
    assert writer.calls == [], "an open breaker means no PostgreSQL call"
    assert spool.batches == [] and segment_ids(spool.directory) == ["log-0", "log-1", "log-2"]


# --- shutdown ----------------------------------------------------------------------------


def test_close_with_postgres_healthy_writes_the_queue_and_deletes_the_segment(journaled, writer, spool):
    log, _wal = journaled(batch_size=10)
    spool.start_after_the_first_replay_pass(log)
    for i in range(5):
        log.submit(make_row(i))
    log.close(timeout=WAIT)
    assert writer.stored_ids() == [f"log-{i}" for i in range(5)]
    assert segments(spool.directory) == [] and records_on_disk(spool.directory) == [], "nothing left to replay"


def test_close_while_postgres_hangs_returns_at_once_and_leaves_the_segment_for_replay(journaled, writer, spool):
    log, _wal = journaled(batch_size=10, close_flush_seconds=0.05)
    for i in range(15):
        log.submit(make_row(i))
    with writer.holding():
        spool.start_after_the_first_replay_pass(log)
        assert writer.entered.wait(WAIT), "the writer never started its batch"
        closer = threading.Thread(target=log.close, args=(FOREVER,))
        closer.start()
        closer.join(WAIT)
        returned = not closer.is_alive()
        on_disk = segment_ids(spool.directory)
        handed_over = unlocked(segments(spool.directory))
    assert returned, "close() waited for the hung write"
    assert on_disk == [f"log-{i}" for i in range(15)], "the segment must hold every row"
    assert handed_over == segments(spool.directory) != [], "the segment must be unlocked: handed over to replay"
    assert records_on_disk(spool.directory) == [], "no row is written a second time"
    assert writer.close_timeout <= 0.05, f"the pool is given the flush budget left, not {writer.close_timeout} s"
    # The next worker replays it; the rows the hung write commits after all are stored once (ON CONFLICT).
    replayer = FakeWriter()
    log_b, _ = journaled(writer=replayer)
    log_b._replayer.replay_once()
    assert replayer.stored_ids() == [f"log-{i}" for i in range(15)]


def test_submit_after_close_goes_to_the_spool(journaled, writer, spool):
    log, _wal = journaled()
    log.close(timeout=0.1)
    log.submit(make_row(1))
    spool.close()
    assert [record["log_id"] for record in records_on_disk(spool.directory)] == ["log-1"]
    assert segments(spool.directory) == []


# --- failures of the append ----------------------------------------------------------------


def test_a_full_disk_fails_no_request_and_the_row_is_still_shipped(journaled, writer, spool, caplog):
    clock = FakeClock()
    log, wal = journaled(wal=make_wal(spool, clock=clock))
    log.submit(make_row(0))
    (segment,) = segments(spool.directory)
    lock = disk_full_under(segment)
    with caplog.at_level(logging.ERROR, logger=WAL_LOGGER):
        log.submit(make_row(1))  # must not raise: a request is never failed by its log row
        log.submit(make_row(2))  # within the retry interval: no new segment is even tried
    assert wal.status()["unjournaled_rows"] == 2, wal.status()
    assert len(segments(spool.directory)) == 1, "no segment is opened while the disk is failing"
    errors = [record.getMessage() for record in caplog.records if record.name == WAL_LOGGER]
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    spool.start_after_the_first_replay_pass(log)
    writer.wait_until(lambda w: w.stored_ids() == ["log-0", "log-1", "log-2"], "every row is shipped from memory")
    clock.now += 1.0  # the retry interval has passed: the next row is journaled again
    log.submit(make_row(3))
    assert "log-3" in segment_ids(spool.directory), "appends resume once the retry interval is over"
    os.close(lock)


# A process whose file size limit cuts a segment's append short, as a disk filling mid-write does.
SHORT_WRITE = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from requestlog_fakes import FakeClock, make_row
    from falcon_svc.requestlog import Spool, WriteAheadLog
    from falcon_svc.requestlog.rows import encode_row

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: a short write, then EFBIG
    wal = WriteAheadLog(Spool(Path(sys.argv[1]), 10**7), clock=FakeClock())
    first = wal.append(encode_row(make_row(0)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (first.bytes + 40, resource.RLIM_INFINITY))
    assert wal.append(encode_row(make_row(1))) is None, "a short write journaled the row"
    print(wal.status()["unjournaled_rows"])
    """
)


def test_a_short_write_leaves_no_partial_line_in_its_segment(tmp_path):
    directory = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)])}
    done = subprocess.run(
        [sys.executable, "-c", SHORT_WRITE, str(directory)], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == b"1", done.stderr.decode()[-2000:]
    (segment,) = segments(directory)
    assert segment.read_bytes() == encode_row(make_row(0)), "the cut line was not removed: it would spoil the next"


def test_a_spool_directory_at_its_bound_takes_no_journal_and_the_row_is_still_shipped(journaled, writer, tmp_path):
    bounded = SignallingSpool(tmp_path / "bounded", max_bytes=100)  # less than one line
    log, wal = journaled(spool=bounded, batch_size=1)
    log.submit(make_row(0))
    assert segment_ids(bounded.directory) == [] and wal.status()["unjournaled_rows"] == 1
    bounded.start_after_the_first_replay_pass(log)
    writer.wait_until(lambda w: w.stored_ids() == ["log-0"], "the row is shipped from memory")


def test_rows_the_log_could_not_take_are_spooled_when_they_are_set_aside(journaled, writer, spool):
    wal = make_wal(spool)
    wal.close()  # from now on it takes no row, as when every append fails
    log, _wal = journaled(wal=wal, buffer_max=1)  # never started
    log.submit(make_row(0))
    log.submit(make_row(1))
    assert [record["log_id"] for record in records_on_disk(spool.directory)] == ["log-1"], "queue full: spooled"
    log.close(timeout=0.1)
    assert sorted(record["log_id"] for record in records_on_disk(spool.directory)) == ["log-0", "log-1"]
    assert segments(spool.directory) == []


# --- fsync ---------------------------------------------------------------------------------


def test_the_settings_offer_exactly_the_fsync_modes_the_log_knows():
    assert LOG_FSYNC_MODES == FSYNC_MODES
    with pytest.raises(ValueError, match="fsync must be one of off, interval, always"):
        WriteAheadLog(Spool(Path("/nonexistent"), 1), fsync="sometimes")


@pytest.mark.parametrize(
    ("mode", "on_appends", "on_tick"),
    [
        ("off", [], []),
        # The new segment's directory entry first (a power cut must not lose the name), then each append.
        ("always", ["dir", "data", "data", "data"], []),
        # Nothing on the request path but the directory entry; the tick syncs the segment once.
        ("interval", ["dir"], ["data"]),
    ],
)
def test_each_fsync_mode_syncs_where_it_says(journaled, spool, monkeypatch, mode, on_appends, on_tick):
    synced: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("dir"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append("data"), real_fdatasync(fd))[1])
    clock = FakeClock()
    log, wal = journaled(wal=make_wal(spool, fsync=mode, clock=clock, sync_interval=0.2))
    for i in range(3):
        log.submit(make_row(i))
    assert synced == on_appends
    synced.clear()
    clock.now += 0.5  # past sync_interval, short of a rotation
    wal.maintain()
    assert synced == on_tick


@pytest.mark.parametrize("mode", LOG_FSYNC_MODES)
def test_each_fsync_mode_journals_and_ships(journaled, writer, spool, mode):
    clock = FakeClock()
    log, wal = journaled(wal=make_wal(spool, fsync=mode, clock=clock, sync_interval=0.2))
    for i in range(3):
        log.submit(make_row(i))
    clock.now += ROTATED
    wal.maintain()
    assert segment_ids(spool.directory) == ["log-0", "log-1", "log-2"]
    assert wal.status()["fsync"] == mode


def test_a_segment_kept_for_replay_rotates_every_ten_seconds_not_every_second(spool):
    """During an outage every segment is handed over: one a second per worker would pile up files."""
    clock = FakeClock()
    wal = make_wal(spool, clock=clock, max_age=1.0)
    kept = wal.append(encode_row(make_row(0)))
    assert kept is not None
    wal.resolve({kept: 1}, keep=True)  # its batch failed: the row waits on disk for replay
    clock.now += 2.0
    wal.maintain()
    assert wal.status()["handed_over_segments"] == 0, "a kept segment rotated after a second"
    clock.now += KEPT_SEGMENT_MAX_AGE_SECONDS
    wal.maintain()
    assert wal.status()["handed_over_segments"] == 1
    wal.close()

    clock = FakeClock()
    wal = make_wal(spool, clock=clock, max_age=1.0)
    written = wal.append(encode_row(make_row(1)))
    assert written is not None
    wal.resolve({written: 1}, keep=False)
    clock.now += 2.0
    wal.maintain()
    assert wal.status()["segments"] == 0, "a segment of written rows lives about a second"
    wal.close()


def test_a_segment_opened_while_the_writer_lags_also_lives_ten_seconds(spool):
    """Batches take seconds to fail as PostgreSQL goes down: the segments meanwhile must not be one a second."""
    clock = FakeClock()
    wal = make_wal(spool, clock=clock, max_age=1.0)
    first = wal.append(encode_row(make_row(0)))
    clock.now += 2.0
    wal.maintain()  # rotated: its row is still in flight
    second = wal.append(encode_row(make_row(1)))
    assert first is not None and second is not None and second is not first
    clock.now += 2.0
    wal.maintain()
    assert wal.append(encode_row(make_row(2))) is second, "rotated after a second while the writer lags"
    wal.resolve({first: 1}, keep=False)
    wal.resolve({second: 2}, keep=False)
    clock.now += 0.1
    wal.maintain()
    assert wal.status()["segments"] == 0, "once caught up, the one-second rule is back"
    wal.close()


def test_rotate_soon_hands_over_a_kept_segment_at_the_next_tick(spool):
    """PostgreSQL is back: the rows kept in the segment open through the outage go to replay now."""
    clock = FakeClock()
    wal = make_wal(spool, clock=clock, max_age=1.0)
    kept = wal.append(encode_row(make_row(0)))
    assert kept is not None
    wal.resolve({kept: 1}, keep=True)
    clock.now += 0.1
    wal.maintain()
    assert wal.status()["handed_over_segments"] == 0
    wal.rotate_soon()
    wal.maintain()
    assert wal.status()["handed_over_segments"] == 1
    wal.close()
