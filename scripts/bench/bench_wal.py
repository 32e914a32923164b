"""Benchmark the request log's write-ahead append: what it adds to the request path, and how long close() takes.

Usage: python scripts/bench/bench_wal.py [--rows 20000] [--rounds 7] [--always-rows 300] [--no-close]

Append cost: times ``RequestLog.submit`` (what the request path calls, once per
logged request) over ``--rows`` rows built as the request path builds them,
without a write-ahead log and with one (``LOG_FSYNC=off``, the default, and
``always``), in a spool directory on this machine's disk. The log is not
started, so nothing but the request path's own work is timed. Modes alternate
over ``--rounds`` rounds (this machine is shared and noisy): the fastest round
of each mode is what the code costs, the medians what this machine gave. Prints
one line: the append's added microseconds per row (target <= 10).

close() time (skip with ``--no-close``): starts a throw-away PostgreSQL, submits
1,000 rows to a started log and times ``close(20.0)`` (the timeout gunicorn's
worker_exit may pass) with PostgreSQL up, hung (SIGSTOPped) and down (stopped):
a stopping worker must be gone in well under 250 ms (issue 12, item 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # NOTE: reuse the test server (loopback, free port)

from bench_replay import spooled_row  # noqa: E402  # NOTE: this script's directory is on sys.path
from servers import PostgresServer  # noqa: E402

from falcon_svc.requestlog import LogRow, PostgresWriter, RequestLog, Spool, WriteAheadLog  # noqa: E402
from falcon_svc.requestlog.migrate import apply_migrations  # noqa: E402
from falcon_svc.resilience import CircuitBreaker, RetryPolicy  # noqa: E402

TARGET_US = 10.0
CLOSE_ROWS = 1_000
POLICY = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=5.0)  # the production defaults


def request_row(i: int) -> LogRow:
    """Return a row like those the request path logs (bench_replay's: server-made ids, a keyed digest, no text)."""
    return spooled_row(i, time.time())


def log_over(directory: Path, dsn: str, fsync: str | None, buffer_max: int) -> RequestLog:
    """Return a production request log over ``directory`` (``fsync`` None: without a write-ahead log)."""
    spool = Spool(directory, 2**34)
    wal = None if fsync is None else WriteAheadLog(spool, fsync=fsync)
    return RequestLog(
        PostgresWriter(dsn, pool_timeout=2.0),
        spool,
        CircuitBreaker("postgres"),
        POLICY,
        buffer_max=buffer_max,
        flush_interval=0.2,
        wal=wal,
    )


def submit_us(fsync: str | None, rows: int, base: Path) -> float:
    """Return the microseconds one ``submit`` takes, on average over ``rows`` rows, in a fresh directory."""
    batch = [request_row(i) for i in range(rows)]
    with tempfile.TemporaryDirectory(dir=base) as directory:
        log = log_over(Path(directory), "postgresql://unused@127.0.0.1:9/none", fsync, rows + 1)
        started = time.perf_counter()
        for row in batch:
            log.submit(row)
        seconds = time.perf_counter() - started
        log.close(0.0)
    return seconds / rows * 1e6


def measure_append(args: argparse.Namespace, base: Path) -> None:
    """Print the append's added cost: the fastest rounds (what the code costs) and the median ones (this machine)."""
    rounds: dict[str, list[float]] = {"without": [], "off": [], "always": []}
    for _ in range(args.rounds):
        rounds["without"].append(submit_us(None, args.rows, base))
        rounds["off"].append(submit_us("off", args.rows, base))
    for _ in range(3):
        rounds["always"].append(submit_us("always", args.always_rows, base))
    best = {mode: min(times) for mode, times in rounds.items()}
    median = {mode: statistics.median(times) for mode, times in rounds.items()}
    added = best["off"] - best["without"]
    print(
        f"wal append: +{added:.1f} us/row on the request path (submit {best['without']:.1f} us without the log, "
        f"{best['off']:.1f} us with it, LOG_FSYNC=off; medians {median['without']:.1f} and {median['off']:.1f}); "
        f"LOG_FSYNC=always: {median['always']:,.0f} us/row; target <= {TARGET_US:g} us: "
        f"{'ok' if added <= TARGET_US else 'OVER'}"
    )


def close_ms(postgres: PostgresServer, base: Path, outage: str) -> tuple[float, int]:
    """Submit rows to a started log, put PostgreSQL in ``outage`` (up, hung, down), return close()'s ms and segments."""
    with tempfile.TemporaryDirectory(dir=base) as directory:
        log = log_over(Path(directory), postgres.dsn, "off", 10_000)
        log.start()
        for i in range(CLOSE_ROWS // 2):
            log.submit(request_row(i))
        time.sleep(0.5)  # the pool has connected and the writer has written
        if outage == "hung":
            postgres.pause()
        elif outage == "down":
            postgres.stop("immediate")
        for i in range(CLOSE_ROWS // 2):
            log.submit(request_row(i))
        started = time.perf_counter()
        log.close(20.0)
        seconds = time.perf_counter() - started
        left = len(list(Path(directory).glob("wal-*.jsonl")))
        if outage == "hung":
            postgres.resume()
        elif outage == "down":
            postgres.start()
    return seconds * 1000, left


def measure_close(base: Path) -> None:
    with tempfile.TemporaryDirectory() as pg_dir:
        postgres = PostgresServer(Path(pg_dir))
        postgres.init()
        try:
            apply_migrations(postgres.dsn)
            results = [(outage, *close_ms(postgres, base, outage)) for outage in ("up", "hung", "down")]
        finally:
            postgres.resume()
            postgres.destroy()
    timings = [f"PostgreSQL {outage} {ms:.0f} ms ({left} segments left for replay)" for outage, ms, left in results]
    print(f"close() with {CLOSE_ROWS} rows submitted: {', '.join(timings)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--always-rows", type=int, default=300)
    parser.add_argument("--no-close", action="store_true", help="skip the close() timings (no PostgreSQL)")
    args = parser.parse_args()
    # NOTE: on the repository's disk, as the spool is in production (not a tmpfs /tmp).
    base = REPO_ROOT / "var"
    base.mkdir(exist_ok=True)
    measure_append(args, base)
    if not args.no_close:
        measure_close(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
