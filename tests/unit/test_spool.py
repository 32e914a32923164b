"""The on-disk spool: ordering, the size bound, crash leftovers and files of other processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from falcon_svc.requestlog import spool_batches, spool_files
from falcon_svc.requestlog.spool import Spool
from falcon_svc.requestlog.spool_batches import SpooledBatch
from falcon_svc.requestlog.spool_files import REJECTED_GLOB, SPOOL_GLOB, encode

REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rows_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("falcon_request_log_rows_total", {"outcome": outcome}) or 0.0


def records(start: int, stop: int) -> list[dict]:
    return [{"request_id": f"r{i}", "n": i} for i in range(start, stop)]


class Collector:
    """A writer that remembers every batch it was given."""

    def __init__(self, fail_on_batch: int | None = None) -> None:
        self.batches: list[list[dict]] = []
        self._fail_on = fail_on_batch

    def __call__(self, batch: list[dict]) -> None:
        if self._fail_on is not None and len(self.batches) == self._fail_on:
            self._fail_on = None
            raise ConnectionError("database went away")
        self.batches.append(list(batch))

    @property
    def ids(self) -> list[str]:
        return [record["request_id"] for batch in self.batches for record in batch]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", max_bytes=10**6, refresh_interval=0)


def test_replay_returns_rows_in_append_order_across_sealed_files(spool: Spool) -> None:
    assert spool.append(records(0, 3)) == 3
    spool.seal()
    assert spool.append(records(3, 5)) == 2
    assert len(list(spool.directory.glob(SPOOL_GLOB))) == 2, "seal should start a new file"

    writer = Collector()
    assert spool.replay(writer, batch_size=2) == 5

    assert writer.ids == [f"r{i}" for i in range(5)], "rows should come back oldest file first, in order"
    assert all(len(batch) <= 2 for batch in writer.batches), "batches should respect batch_size"
    assert list(spool.directory.iterdir()) == [], "replayed files should be deleted"
    assert spool.size_bytes(refresh=True) == 0


def test_appends_after_replay_go_to_a_new_file(spool: Spool) -> None:
    spool.append(records(0, 2))
    spool.replay(Collector(), batch_size=10)
    spool.append(records(2, 3))

    writer = Collector()
    spool.replay(writer, batch_size=10)
    assert writer.ids == ["r2"]


def test_failed_replay_keeps_the_file_and_repeats_it_from_the_start(spool: Spool) -> None:
    spool.append(records(0, 6))
    failing = Collector(fail_on_batch=1)
    with pytest.raises(ConnectionError):
        spool.replay(failing, batch_size=2)
    assert failing.ids == ["r0", "r1"]
    assert len(list(spool.directory.glob(SPOOL_GLOB))) == 1, "an interrupted file must stay for the next replay"

    again = Collector()
    assert spool.replay(again, batch_size=2) == 6
    assert again.ids == [f"r{i}" for i in range(6)], "the whole file is replayed again (the writer dedups)"


def test_stop_request_leaves_the_file_for_later(spool: Spool) -> None:
    spool.append(records(0, 4))
    writer = Collector()
    spool.replay(writer, batch_size=2, should_stop=lambda: len(writer.batches) >= 1)
    assert writer.ids == ["r0", "r1"]
    assert len(list(spool.directory.glob(SPOOL_GLOB))) == 1


def test_rows_past_the_size_bound_are_dropped_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    line_bytes = len(b'{"request_id":"r0","n":0}\n')
    spool = Spool(tmp_path / "spool", max_bytes=3 * line_bytes, refresh_interval=0, drop_log_interval=60, clock=clock)
    dropped_before, spooled_before = rows_total("dropped"), rows_total("spooled")

    with caplog.at_level(logging.ERROR, logger="falcon_svc.requestlog"):
        stored = spool.append(records(0, 5))
        assert spool.append(records(5, 7)) == 0
        drop_lines_before_interval = sum("dropped" in r.getMessage() for r in caplog.records)
        clock.now += 61
        spool.append(records(7, 8))

    assert stored == 3
    assert rows_total("dropped") - dropped_before == 5, "every row past the bound is counted"
    assert rows_total("spooled") - spooled_before == 3
    assert drop_lines_before_interval == 1, "drop log lines should be rate-limited"
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 2, "a new interval logs again"
    assert spool.size_bytes(refresh=True) <= spool.max_bytes

    writer = Collector()
    spool.replay(writer, batch_size=10)
    assert writer.ids == ["r0", "r1", "r2"], "stored rows survive; only the overflow is lost"


def test_replay_frees_room_for_new_rows(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=200, refresh_interval=0)
    spool.append(records(0, 20))
    assert spool.append(records(20, 21)) == 0
    spool.replay(Collector(), batch_size=100)
    assert spool.append(records(21, 22)) == 1


def test_a_truncated_last_line_is_skipped_and_logged(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    spool.directory.mkdir(parents=True)
    crashed = spool.directory / "spool-00000000000000000001-999999-000001.jsonl"
    crashed.write_bytes(b'{"request_id":"a"}\n{"request_id":"b"}\n{"request_id":"c","n')
    dropped_before = rows_total("dropped")

    writer = Collector()
    with caplog.at_level(logging.WARNING, logger="falcon_svc.requestlog"):
        assert spool.replay(writer, batch_size=10) == 2

    assert writer.ids == ["a", "b"]
    assert any("truncated last line 3" in r.getMessage() for r in caplog.records), "the skipped line is logged"
    assert rows_total("dropped") - dropped_before == 1
    assert not crashed.exists()


def test_records_that_cannot_be_encoded_are_dropped_not_raised(spool: Spool) -> None:
    dropped_before = rows_total("dropped")
    assert spool.append([{"request_id": "x", "bad": object()}, {"request_id": "y"}]) == 1
    assert rows_total("dropped") - dropped_before == 1


def test_an_unwritable_directory_drops_rows_instead_of_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    spool = Spool(blocker / "spool", max_bytes=10**6, refresh_interval=0)
    dropped_before = rows_total("dropped")
    assert spool.append(records(0, 2)) == 0
    assert rows_total("dropped") - dropped_before == 2


def test_write_errors_are_logged_once_per_interval_with_the_count_of_those_held_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    spool = Spool(blocker / "spool", max_bytes=10**6, refresh_interval=0, error_log_interval=10, clock=clock)
    dropped_before = rows_total("dropped")

    def error_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "spool write failed" in r.getMessage()]

    with caplog.at_level(logging.ERROR, logger="falcon_svc.requestlog"):
        for i in range(5):
            assert spool.append(records(i, i + 1)) == 0
        assert len(error_lines()) == 1, f"one line per interval, not one per failure: {error_lines()}"
        clock.now += 10
        spool.append(records(5, 6))

    assert len(error_lines()) == 2, "a new interval logs again"
    assert "4 more failures" in error_lines()[1], f"the next line counts those held back: {error_lines()[1]}"
    assert rows_total("dropped") - dropped_before == 6, "every failed row is still counted"


def test_empty_files_are_not_left_behind(spool: Spool) -> None:
    spool.append(records(0, 1))
    spool.replay(Collector(), batch_size=10)
    spool.seal()
    spool.close()
    assert list(spool.directory.iterdir()) == []


def test_an_abandoned_new_file_is_cleaned_up_but_not_one_being_created(spool: Spool) -> None:
    spool.directory.mkdir(parents=True)
    leftover = spool.directory / ".new-spool-00000000000000000001-999999-000001.jsonl"
    leftover.write_bytes(b"")
    old = time.time() - spool_files.ABANDONED_AFTER_SECONDS - 1
    os.utime(leftover, (old, old))
    # Another process's file between its creation and its flock (unlocked for an instant):
    # deleting it made that process's create_locked fail, and its rows went unjournaled.
    being_created = spool.directory / ".new-wal-00000000000000000002-999998-000001.jsonl"
    being_created.write_bytes(b"")
    spool.replay(Collector(), batch_size=10)
    assert not leftover.exists()
    assert being_created.exists()


OTHER_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from falcon_svc.requestlog.spool import Spool

    spool = Spool(Path(sys.argv[1]), max_bytes=10**6, refresh_interval=0)
    spool.append([{"request_id": f"other{i}"} for i in range(3)])
    print("ready", flush=True)
    sys.stdin.read()  # hold the file (and its lock) until killed
    """
)


def test_a_live_process_file_is_left_alone_and_a_dead_ones_is_replayed(spool: Spool) -> None:
    spool.directory.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_WORKER, str(spool.directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == b"ready"
        spool.append(records(0, 2))

        assert spool.size_bytes(refresh=True) > len(b'{"request_id":"r0","n":0}\n') * 2, (
            "the bound should count the other process's file too"
        )
        writer = Collector()
        spool.replay(writer, batch_size=10)
        assert writer.ids == ["r0", "r1"], "a file locked by a live process must not be replayed"
        assert len(list(spool.directory.glob(SPOOL_GLOB))) == 1, "the live process's file stays"
    finally:
        other.kill()  # a crash: no seal, no fsync
        other.wait(timeout=10)

    writer = Collector()
    spool.replay(writer, batch_size=10)
    assert writer.ids == ["other0", "other1", "other2"], "a dead worker's file is replayed"
    assert list(spool.directory.glob(SPOOL_GLOB)) == []


def test_rejected_rows_are_kept_aside_counted_and_never_replayed(spool: Spool) -> None:
    spool.directory.mkdir(parents=True)
    dropped_before, rejected_before = rows_total("dropped"), rows_total("rejected")
    spool.reject(records(0, 2), reason="DataError: bad value")

    (rejected,) = spool.directory.glob(REJECTED_GLOB)
    assert len(rejected.read_bytes().splitlines()) == 2
    assert rows_total("rejected") - rejected_before == 2, "set-aside rows are counted as rejected"
    assert rows_total("dropped") == dropped_before, "kept rows are not lost, so not dropped"
    writer = Collector()
    spool.replay(writer, batch_size=10)
    assert writer.ids == [], "rejected rows would only fail again"
    assert spool.size_bytes(refresh=True) == rejected.stat().st_size, "they still count towards the bound"
    assert spool.rejected_bytes() == rejected.stat().st_size, "their size is reported apart"
    assert REGISTRY.get_sample_value("falcon_request_log_rejected_bytes") == rejected.stat().st_size


def test_rejected_rows_that_cannot_be_kept_are_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "never-made", max_bytes=10**6, refresh_interval=0)
    dropped_before, rejected_before = rows_total("dropped"), rows_total("rejected")
    spool.reject(records(0, 3), reason="DataError: bad value")
    assert rows_total("dropped") - dropped_before == 3, "rows that could not be set aside are lost: dropped"
    assert rows_total("rejected") == rejected_before


def reject_at(spool: Spool, first: int, mtime: float) -> Path:
    """Set aside one row, as if it had been rejected at Unix time ``mtime``."""
    before = set(spool.directory.glob(REJECTED_GLOB))
    spool.reject(records(first, first + 1), reason="DataError: bad value")
    (path,) = set(spool.directory.glob(REJECTED_GLOB)) - before
    os.utime(path, (mtime, mtime))
    return path


def test_rejected_files_past_their_retention_are_deleted_at_most_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, wall = FakeClock(), FakeClock()
    wall.now = 1_800_000_000.0
    day = 86_400
    spool = Spool(
        tmp_path / "spool",
        max_bytes=10**6,
        refresh_interval=0,
        rejected_retention=7 * day,
        clean_interval=3600,
        clock=clock,
        wall_clock=wall,
    )
    spool.directory.mkdir(parents=True)
    expired = reject_at(spool, 0, wall.now - 8 * day)
    kept = reject_at(spool, 1, wall.now - 6 * day)

    with caplog.at_level(logging.WARNING, logger="falcon_svc.requestlog"):
        spool.clean_rejected()
    assert not expired.exists(), "a file past its retention is deleted"
    assert kept.exists(), "a file within its retention is kept"
    assert any(expired.name in r.getMessage() and "deleted 1" in r.getMessage() for r in caplog.records), (
        "the deletion is logged with the file's name"
    )
    assert spool.rejected_bytes() == kept.stat().st_size

    wall.now += 2 * day  # `kept` has expired now too
    clock.now += 3599
    spool.clean_rejected()
    assert kept.exists(), "cleaning happens at most once per clean_interval"
    clock.now += 1
    spool.clean_rejected()
    assert not kept.exists(), "the next interval deletes it"
    assert spool.rejected_bytes() == 0


def test_rejected_files_past_half_the_bound_are_deleted_oldest_first(tmp_path: Path) -> None:
    wall = FakeClock()
    wall.now = 1_800_000_000.0
    line_bytes = len(b'{"request_id":"r0","n":0}\n')
    spool = Spool(tmp_path / "spool", max_bytes=6 * line_bytes, refresh_interval=0, wall_clock=wall)
    spool.directory.mkdir(parents=True)
    files = [reject_at(spool, i, wall.now - 100 + i) for i in range(5)]  # all well within the retention

    spool.clean_rejected()
    assert [path.exists() for path in files] == [False, False, True, True, True], (
        "rejected rows may take half the bound (3 lines); the oldest go first"
    )
    assert spool.size_bytes(refresh=True) == 3 * line_bytes


# --- replay batches -------------------------------------------------------------------


class RawWriter:
    """A writer that stores the lines as they are, as PostgresWriter does, keyed like ON CONFLICT DO NOTHING.

    It can crash right after a batch "commits" (``crash_after``), before replay is done with the file.
    """

    def __init__(self, crash_after: int | None = None, directory: Path | None = None) -> None:
        self.stored: dict[str, int] = {}  # request_id -> times written
        self.batches: list[SpooledBatch] = []
        self.files_seen: list[list[str]] = []  # the spool files on disk as each batch was written
        self._crash_after = crash_after
        self._directory = directory

    def __call__(self, batch: SpooledBatch) -> None:
        if self._directory is not None:
            self.files_seen.append(sorted(path.name for path in self._directory.glob(SPOOL_GLOB)))
        for line in batch.lines:
            request_id = json.loads(line)["request_id"]
            self.stored[request_id] = self.stored.get(request_id, 0) + 1
        self.batches.append(batch)
        if self._crash_after is not None and len(self.batches) == self._crash_after:
            self._crash_after = None
            raise ConnectionError("the worker died after the commit")

    def distinct(self) -> list[str]:
        return sorted(self.stored, key=lambda request_id: int(request_id[1:]))


def spool_files_of(spool: Spool, *sizes: int) -> list[str]:
    """Spool files of ``sizes`` rows each, numbered on from r0; return their names, oldest first."""
    start = 0
    for size in sizes:
        spool.append(records(start, start + size))
        spool.seal()
        start += size
    return sorted(path.name for path in spool.directory.glob(SPOOL_GLOB))


def test_small_files_share_a_batch_and_a_boundary_inside_a_file_gives_its_rest_to_the_next(spool: Spool) -> None:
    # An outage leaves a segment per process every 10 s: one transaction per file was
    # what held the e2e host's replay under 20,000 rows/s.
    first, second, third = spool_files_of(spool, 3, 2, 4)
    writer = RawWriter()
    assert spool.replay(writer, batch_size=4) == 9
    shapes = [[(path.name, first_line, count) for path, first_line, count in batch.parts] for batch in writer.batches]
    assert shapes == [
        [(first, 1, 3), (second, 1, 1)],
        [(second, 2, 1), (third, 1, 3)],
        [(third, 4, 1)],
    ], shapes
    assert writer.distinct() == [f"r{i}" for i in range(9)]
    assert not any(batch.decoded for batch in writer.batches), "a writer of raw lines must not pay for decoding"
    assert list(spool.directory.glob(SPOOL_GLOB)) == []


def test_a_batch_holds_at_most_max_batch_files_files_open(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A quiet outage leaves many segments of a few rows: held open until their batch is
    # written, a thousand of them ran a worker out of descriptors (EMFILE) for good.
    monkeypatch.setattr(spool_batches, "MAX_BATCH_FILES", 3)
    spool_files_of(spool, 1, 1, 1, 1, 1, 1, 1)
    writer = RawWriter()
    assert spool.replay(writer, batch_size=100) == 7
    assert [len(batch.parts) for batch in writer.batches] == [3, 3, 1]
    assert list(spool.directory.glob(SPOOL_GLOB)) == []


def test_a_file_is_deleted_only_once_the_batch_holding_its_last_line_is_written(spool: Spool) -> None:
    first, second, third = spool_files_of(spool, 3, 2, 4)
    writer = RawWriter(directory=spool.directory)
    assert spool.replay(writer, batch_size=4) == 9
    assert writer.files_seen == [[first, second, third], [second, third], [third]], writer.files_seen


def test_a_crash_mid_replay_keeps_every_file_not_yet_whole_in_postgres_and_each_row_lands_once(spool: Spool) -> None:
    _first, second, third = spool_files_of(spool, 3, 2, 4)
    crashing = RawWriter(crash_after=2)
    with pytest.raises(ConnectionError):
        spool.replay(crashing, batch_size=4)
    # The second batch "committed" (r3..r7), but the crash came before its files were done with.
    assert sorted(path.name for path in spool.directory.glob(SPOOL_GLOB)) == [second, third]

    assert spool.replay(crashing, batch_size=4) == 6
    assert crashing.distinct() == [f"r{i}" for i in range(9)], "a row was lost"
    assert [request_id for request_id, times in crashing.stored.items() if times > 1] == ["r3", "r4", "r5", "r6", "r7"]
    assert list(spool.directory.glob(SPOOL_GLOB)) == []


def test_a_stop_between_files_writes_no_half_filled_batch_and_keeps_its_files(spool: Spool) -> None:
    names = spool_files_of(spool, 2, 2, 2)
    asked = []

    def stop_at_the_third_file() -> bool:
        asked.append(True)
        return len(asked) >= 3

    writer = RawWriter()
    assert spool.replay(writer, batch_size=100, should_stop=stop_at_the_third_file) == 0
    assert writer.batches == []
    assert sorted(path.name for path in spool.directory.glob(SPOOL_GLOB)) == names
    assert spool.replay(writer, batch_size=100) == 6, "the files were not released"


def test_a_torn_last_line_right_after_a_batch_boundary_writes_no_empty_batch(spool: Spool) -> None:
    spool.directory.mkdir(parents=True)
    crashed = spool.directory / "spool-00000000000000000001-999999-000001.jsonl"
    crashed.write_bytes(b"".join(encode(record) for record in records(0, 4)) + b'{"request_id":"r4","n')
    dropped_before = rows_total("dropped")
    writer = RawWriter()
    assert spool.replay(writer, batch_size=2) == 4
    assert [len(batch) for batch in writer.batches] == [2, 2], "the torn line made a batch of its own"
    assert all(line.endswith(b"\n") for batch in writer.batches for line in batch.lines)
    assert rows_total("dropped") - dropped_before == 1
    assert not crashed.exists()


def test_a_crash_between_a_batch_commit_and_the_file_s_end_replays_it_again_and_stores_each_row_once(
    spool: Spool,
) -> None:
    spool.append(records(0, 5))
    crashing = RawWriter(crash_after=2)
    with pytest.raises(ConnectionError):
        spool.replay(crashing, batch_size=2)
    assert len(list(spool.directory.glob(SPOOL_GLOB))) == 1, "the file must stay: its last row is not written"

    assert spool.replay(crashing, batch_size=2) == 5
    assert crashing.distinct() == [f"r{i}" for i in range(5)], "a row was lost"
    assert crashing.stored == {"r0": 2, "r1": 2, "r2": 2, "r3": 2, "r4": 1}, "the committed batches are sent again"
    assert list(spool.directory.glob(SPOOL_GLOB)) == []
    # A second replay of nothing stores nothing more: every row once, as ON CONFLICT DO NOTHING keeps them.
    assert spool.replay(crashing, batch_size=2) == 0


def test_a_batch_is_decoded_only_when_its_records_are_asked_for_and_skips_unreadable_lines(tmp_path: Path) -> None:
    lines = [encode({"request_id": "a"}), b"not json\n", b"[1, 2]\n", encode({"request_id": "b"})]
    batch = SpooledBatch()
    batch.add(tmp_path / "spool-x.jsonl", 7, lines)
    assert not batch.decoded and len(batch) == 4, "before decoding, len counts lines"
    assert [record["request_id"] for record in batch] == ["a", "b"]
    assert batch.decoded and len(batch) == 2 and batch.unreadable == 2
    assert batch[1:] == [{"request_id": "b"}], "a slice is a list of records (replay halves refused batches)"


def test_unreadable_lines_found_when_a_batch_is_decoded_are_dropped_and_counted(spool: Spool) -> None:
    spool.directory.mkdir(parents=True)
    path = spool.directory / "spool-00000000000000000001-999999-000001.jsonl"
    path.write_bytes(encode({"request_id": "a"}) + b"garbage\n" + encode({"request_id": "b"}))
    # A second file in the same batch: its unreadable line is its own.
    other = spool.directory / "spool-00000000000000000002-999999-000001.jsonl"
    other.write_bytes(b"[1]\n" + encode({"request_id": "c"}))
    dropped_before = rows_total("dropped")
    writer = Collector()  # decodes every batch, as PostgresWriter does when PostgreSQL refuses the raw lines
    assert spool.replay(writer, batch_size=10) == 3
    assert writer.ids == ["a", "b", "c"] and len(writer.batches) == 1
    assert rows_total("dropped") - dropped_before == 2
    # NOTE: the "dropped" log lines are throttled; the metric counts every row.


def test_a_batch_of_large_rows_ends_at_its_byte_bound(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    line_bytes = len(encode({"request_id": "r0", "n": 0}))
    monkeypatch.setattr(spool_batches, "MAX_BATCH_BYTES", 3 * line_bytes)
    spool.append(records(0, 7))
    writer = RawWriter()
    assert spool.replay(writer, batch_size=100) == 7
    assert [len(batch) for batch in writer.batches] == [3, 3, 1], "a batch went past its byte bound"
