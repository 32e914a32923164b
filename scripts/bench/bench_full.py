"""Benchmark the full request path (Redis cache + PostgreSQL request log) against the bare service.

Usage: python scripts/bench/bench_full.py [--duration 10] [--connections 8] [--worker-class meinheld]

Starts a throw-away redis-server and PostgreSQL on free loopback ports, then runs
2 gunicorn workers in five configurations side by side, each under wrk:

- bare: no cache, no request log (the service of issue 2);
- log only: the request log, no cache;
- full, Redis for every text: CACHE_REDIS_MIN_CHARS=0, every miss asks Redis;
- full, unique texts: the defaults; every request misses the cache and is logged;
- full, repeated text: every request hits the cache and is logged.

Prints rps, p50/p99 and the cost the cache and log add per request, computed
from throughput (1/rps is the per-request cost at saturation).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # NOTE: reuse the test servers (loopback, free ports)

from servers import PostgresServer, RedisServer, free_port  # noqa: E402

from falcon_svc.requestlog.migrate import apply_migrations  # noqa: E402

LUA = REPO_ROOT / "scripts" / "bench" / "unique_texts.lua"


def serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "falcon_svc.cli", "serve"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"service did not start: {log.read_text()[-2000:]}")


def wrk(port: int, seconds: int, connections: int, repeat: bool) -> dict:
    env = {**os.environ, "BENCH_REPEAT": "1" if repeat else "0"}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(LUA), f"http://127.0.0.1:{port}"]
    subprocess.run([*command[:3], "-d2s", *command[4:]], env=env, check=True, capture_output=True)  # warm-up
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))


def _median_run(results: list[dict]) -> dict:
    """Return the run with the median throughput (its latencies come with it)."""
    return sorted(results, key=lambda row: row["rps"])[len(results) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--worker-class", default="meinheld")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median run of each configuration counts")
    parser.add_argument("--model-dir", default=str(REPO_ROOT / "models" / "sentiment"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="falcon-bench-"))
    redis_server = RedisServer(work)
    redis_server.start()
    postgres = PostgresServer(work)
    postgres.init()
    apply_migrations(postgres.dsn)
    base = {
        **os.environ,
        "WORKERS": args.workers,
        "WORKER_CLASS": args.worker_class,
        "MODEL_DIR": args.model_dir,
        "LOG_LEVEL": "info",
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": postgres.dsn,
        "LOG_SPOOL_DIR": str(work / "spool"),
    }
    configurations = [
        ("bare (no cache, no log)", {"CACHE_ENABLED": "false", "REQUEST_LOG_ENABLED": "false"}, False),
        ("log only, unique texts", {"CACHE_ENABLED": "false"}, False),
        ("full, Redis for every text", {"CACHE_REDIS_MIN_CHARS": "0"}, False),
        ("full, unique texts (misses)", {}, False),
        ("full, repeated text (hits)", {}, True),
    ]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configurations}
    try:
        # NOTE: round-robin repeats, so a burst of noise on a shared machine hits
        # every configuration alike; the median of each is reported.
        for round_number in range(args.repeat):
            for label, extra, repeat in configurations:
                port = free_port()
                env = {**base, **extra, "BIND": f"127.0.0.1:{port}", "PROMETHEUS_MULTIPROC_DIR": str(work / f"m{port}")}
                process = serve(env, port, work / f"{port}.log")
                try:
                    runs[label].append(wrk(port, args.duration, args.connections, repeat))
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=60)
                print(f"round {round_number + 1} {label:30} {json.dumps(runs[label][-1])}", flush=True)
        rows = [(label, _median_run(results)) for label, results in runs.items()]
        import psycopg

        with psycopg.connect(postgres.dsn) as conn:
            logged = conn.execute("SELECT count(*) FROM request_log").fetchone()[0]
    finally:
        redis_server.stop()
        postgres.destroy()

    load = f"wrk -t1 -c{args.connections} -d{args.duration}s"
    print(f"\n{args.worker_class}, {args.workers} workers, {load}, POST /infer")
    print(f"{'configuration':30} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'us/req':>8} {'non2xx':>7}")
    for label, row in rows:
        print(
            f"{label:30} {row['rps']:9.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
            f"{1e6 / row['rps']:8.1f} {row['non2xx']:7d}"
        )
    results = dict(rows)
    bare, misses, hits = (results[label] for label, _, _ in (configurations[0], *configurations[-2:]))
    print(f"\ncache + log add {bare['rps'] / misses['rps'] - 1:+.1%} per request on misses (target <= +30%)")
    print(f"a cache hit costs {misses['rps'] / hits['rps']:.2f}x a miss (target < 1: cheaper than inference)")
    print(f"request_log rows written during the runs (warm-ups included): {logged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
