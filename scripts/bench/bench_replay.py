"""Benchmark spool replay into PostgreSQL: rows/s of the replay alone, and that it stores each row once.

Usage: python scripts/bench/bench_replay.py [--rows 200000] [--files 4] [--batch-size 10000]

Starts a throw-away PostgreSQL (initdb + pg_ctl on a free loopback port, with
fsync on, as in production), applies the migrations (request_log partitioned by
day, today's partition created), fills a spool directory with ``--rows`` rows
built as the request path builds them (``LogRow`` -> ``row_record``, text
logging off, about 500 bytes a line) in ``--files`` files (one per worker that
spooled through an outage), then times one ``Replayer.replay_once()`` pass: the
production replayer with the production ``PostgresWriter``, nothing else timed.

Prints the rows/s and checks ``count(*) == count(DISTINCT log_id) == rows``;
exits 1 if not. ``--twice`` replays a copy of the same files again (a replay
interrupted after its batches committed and repeated: every row a conflict)
and checks the count is unchanged.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # NOTE: reuse the test server (loopback, free port)

import psycopg  # noqa: E402
from servers import PostgresServer  # noqa: E402

from falcon_svc.requestlog import LogRow, PostgresWriter, Spool  # noqa: E402
from falcon_svc.requestlog.migrate import apply_migrations  # noqa: E402
from falcon_svc.requestlog.replay import REPLAY_BATCH_ROWS, Replayer  # noqa: E402
from falcon_svc.requestlog.rows import row_record  # noqa: E402
from falcon_svc.resilience import CircuitBreaker  # noqa: E402

# The saturation rate of the 2-core e2e host (issue 12): spooled rows are spaced as it answers them.
SATURATION_RPS = 1_700.0


class DurablePostgres(PostgresServer):
    """The test server, but with fsync on: replay's commits pay what they pay in production."""

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=on"
        log = str(self.directory / "pg.log")
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")


def spooled_row(i: int, started: float) -> LogRow:
    """Return a row like those the request path logs: server-made ids, a keyed digest, no text."""
    return LogRow(
        log_id=uuid.uuid4().hex,
        request_id=str(uuid.uuid4()),
        received_at=started + i / SATURATION_RPS,
        route="/v1/infer",
        method="POST",
        status=200,
        worker_id="falcon-host-1:8001:12345",
        model_version="sentiment-20261201-abcdef12",
        label="positive" if i % 3 else "negative",
        confidence=0.5 + (i % 500) / 1000.0,
        n_texts=1,
        cache_hit=i % 4 == 0,
        idempotent_replay=False,
        latency_ms=1.0 + (i % 97) / 10.0,
        text_length=40 + i % 200,
        text_hmac=uuid.uuid4().hex * 2,
        client_key_id="ops-2026",
    )


def fill(spool: Spool, rows: int, files: int) -> None:
    """Spool ``rows`` rows in ``files`` sealed files, appended 100 at a time (a full queue's worth)."""
    started = time.time()
    per_file = -(-rows // files)
    for first in range(0, rows, per_file):
        for chunk in range(first, min(first + per_file, rows), 100):
            end = min(chunk + 100, first + per_file, rows)
            spool.append([row_record(spooled_row(i, started)) for i in range(chunk, end)])
        spool.seal()


def replay(spool: Spool, writer: PostgresWriter, batch_size: int) -> float:
    """Run one replay pass as a worker's replayer thread does; return its duration in seconds."""
    replayer = Replayer(
        spool,
        CircuitBreaker("postgres"),
        writer,
        lambda records, operation: writer.write(records, operation=operation),
        batch_size=batch_size,
        interval=3600.0,
        stopping=threading.Event(),
        report=lambda _ok: None,
    )
    started = time.perf_counter()
    replayer.replay_once()
    return time.perf_counter() - started


def stored(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT log_id) FROM request_log").fetchone()
    assert row is not None
    return row[0], row[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=REPLAY_BATCH_ROWS)
    parser.add_argument("--twice", action="store_true", help="replay the same files again: all conflicts")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="falcon-bench-replay-"))
    postgres = DurablePostgres(work)
    postgres.init()
    writer = PostgresWriter(postgres.dsn, statement_timeout=300.0)
    try:
        apply_migrations(postgres.dsn)
        spool = Spool(work / "spool", max_bytes=10**12, refresh_interval=3600.0)
        fill(spool, args.rows, args.files)
        size = spool.size_bytes(refresh=True)
        if args.twice:
            shutil.copytree(spool.directory, work / "again")
        writer.open()
        writer.probe()  # NOTE: the pool connects before the clock starts
        seconds = replay(spool, writer, args.batch_size)
        count, distinct = stored(postgres.dsn)
        print(
            f"replay of {args.rows} rows ({size / 1e6:.1f} MB, {args.files} files, batches of {args.batch_size}): "
            f"{seconds:.2f} s, {args.rows / seconds:,.0f} rows/s; stored {count}, distinct log_id {distinct}"
        )
        ok = count == distinct == args.rows
        if args.twice:
            seconds = replay(Spool(work / "again", max_bytes=10**12), writer, args.batch_size)
            again = stored(postgres.dsn)
            print(f"replayed again (every row a conflict): {seconds:.2f} s, {args.rows / seconds:,.0f} rows/s; {again}")
            ok = ok and again == (count, distinct)
    finally:
        writer.close()
        postgres.destroy()
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        print("FAILED: the replay did not store every row exactly once", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
