#!/usr/bin/env python3
"""Bounded load against a falcon-svc on loopback, for the failure-injection scripts.

Standard library only: it runs with the deployed host's own python3.

Two modes:

  steady   --duration S --rate R: R requests/s (total, paced) for S seconds from
           --concurrency threads, a mix of what users send (short texts, batches,
           long texts that go through Redis, requests with X-Idempotency-Key).
           --rate 0: closed loop, each thread sends its next request as soon as
           the last is answered: the host's saturation, not a chosen rate.
  burst    --burst N: N large batches sent at once on N connections; once every
           body is written it creates --ready-file, so the caller can stop a
           worker while all N are in flight, then waits for the N answers.

Every request carries X-Request-ID "<run-id>-<n>", so the request log rows of a run
can be counted in PostgreSQL, and ``Authorization: Bearer $FALCON_API_KEY`` when that
variable is set (the environment, not an argument: ps shows arguments to everyone).
Prints, and writes to --out, a JSON summary: counts by HTTP status and by error kind,
latency quantiles, the Idempotency-Status and cache_hit counts, and the first failures
with their time offsets.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import random
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

# Only loopback: these scripts inject faults and must never load anything else.
ALLOWED_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The service's API key, when it requires one (docs/SECURITY.md, "API keys").
AUTH_HEADERS = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("FALCON_API_KEY", "").strip()) else {}

WORDS = (
    "the service was quick and friendly and I loved it",
    "this is the worst delivery I have ever had, truly awful",
    "the parcel arrived on Tuesday as planned",
    "not bad at all, though the box was a little dented",
    "I am disappointed: it broke after two days",
    "great value, would happily buy again",
    "the meeting is moved to room four",
)


@dataclass
class Tally:
    """What one run saw; shared by the threads under a lock."""

    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    idempotency: Counter = field(default_factory=Counter)
    cache_hits: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # (wall-clock send time, latency ms, status or error) of every request, for --timeline.
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    # Request ids answered 2xx, for --answered: a drill matches them with request_log rows.
    answered: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(
        self,
        *,
        request_id: str,
        sent_at: float,
        run_started: float,
        status: int | None,
        error: str | None,
        idem: str | None = None,
        cache_hit: bool = False,
    ) -> None:
        """Count one request sent at ``sent_at`` (time.monotonic()) of a run started at ``run_started``."""
        ms = (time.monotonic() - sent_at) * 1000
        offset = sent_at - run_started
        wall_sent = time.time() - ms / 1000
        with self.lock:
            self.timeline.append((wall_sent, ms, str(status if error is None else error)))
            if status is not None:
                self.statuses[str(status)] += 1
                self.latencies_ms.append(ms)
            if error is not None:
                self.errors[error] += 1
            if idem:
                self.idempotency[idem] += 1
            self.cache_hits += cache_hit
            failed = error is not None or status is None or not 200 <= status < 300
            if not failed:
                self.answered.append(request_id)
            if failed and len(self.failures) < 20:
                self.failures.append(
                    {"t": round(offset, 3), "request_id": request_id, "status": status, "error": error}
                )

    def summary(self, *, run_id: str, seconds: float) -> dict:
        lat = sorted(self.latencies_ms)

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None

        answered = sum(self.statuses.values())
        ok = sum(n for s, n in self.statuses.items() if s.startswith("2"))
        return {
            "run_id": run_id,
            "seconds": round(seconds, 2),
            "sent": answered + sum(self.errors.values()),
            "answered": answered,
            "ok": ok,
            "non_2xx": answered - ok,
            "errors": sum(self.errors.values()),
            "statuses": dict(self.statuses),
            "error_kinds": dict(self.errors),
            "idempotency_status": dict(self.idempotency),
            "cache_hits": self.cache_hits,
            "latency_ms": {"p50": q(0.50), "p99": q(0.99), "max": lat[-1] if lat else None},
            "first_failures": self.failures,
        }


def long_text(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < chars:
        parts.append(rng.choice(WORDS))
    return " ".join(parts)[:chars]


def steady_request(n: int, rng: random.Random) -> tuple[str, dict, dict]:
    """Return (path, body, extra headers) for the n-th request of a steady run."""
    kind = n % 10
    # A counter in every text keeps them unique, so the cache does not hide the model.
    if kind < 6:
        return "/infer", {"text": f"{rng.choice(WORDS)} #{n}"}, {}
    if kind < 8:
        return "/infer/batch", {"texts": [f"{rng.choice(WORDS)} #{n}.{i}" for i in range(5)]}, {}
    if kind == 8:
        # Long enough (>= CACHE_REDIS_MIN_CHARS) to go through the Redis cache tier.
        return "/infer", {"text": f"#{n} " + long_text(rng, 400)}, {}
    return "/infer", {"text": f"{rng.choice(WORDS)} #{n}"}, {"X-Idempotency-Key": f"key-{n}-{rng.getrandbits(48):x}"}


class Client:
    """One keep-alive connection; reconnects after any error."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def send(
    client: Client, tally: Tally, *, path: str, payload: dict, headers: dict, request_id: str, started: float
) -> None:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id, **AUTH_HEADERS, **headers}
    t0 = time.monotonic()
    status = error = idem = None
    cache_hit = False
    try:
        status, resp_headers, data = client.post(path, body, headers)
        idem = resp_headers.get("idempotency-status")
        if status == 200 and path == "/infer":
            cache_hit = bool(json.loads(data).get("cache_hit"))
    except (OSError, http.client.HTTPException) as ex:
        error = type(ex).__name__
    tally.record(
        request_id=request_id,
        sent_at=t0,
        run_started=started,
        status=status,
        error=error,
        idem=idem,
        cache_hit=cache_hit,
    )


def run_steady(args: argparse.Namespace, host: str, port: int) -> Tally:
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.duration
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    counter = iter(range(10**9))
    counter_lock = threading.Lock()
    stop_file = pathlib.Path(args.stop_file) if args.stop_file else None

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        client = Client(host, port, args.timeout)
        while True:
            with counter_lock:
                n = next(counter)
            if interval:
                # Paced: request n is due at started + n * interval, whoever sends it.
                due = started + n * interval
                if due >= deadline:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            elif time.monotonic() >= deadline:
                break
            if stop_file is not None and stop_file.exists():
                break
            path, payload, headers = steady_request(n, rng)
            send(
                client,
                tally,
                path=path,
                payload=payload,
                headers=headers,
                request_id=f"{args.run_id}-{n}",
                started=started,
            )
        client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.timeout + 5)
    return tally


def run_burst(args: argparse.Namespace, host: str, port: int) -> Tally:
    """N big batches in flight at once; --ready-file appears once all are sent."""
    tally = Tally()
    rng = random.Random(1)
    started = time.monotonic()
    conns = []
    # NOTE: every body is built before the first is sent, so the batches reach the server
    # within milliseconds of each other and queue there, rather than one by one as the
    # next body is encoded (~50 ms each, longer than the server takes to answer one).
    bodies = [
        json.dumps({"texts": [f"#{n}.{i} " + long_text(rng, args.chars) for i in range(args.batch_size)]}).encode()
        for n in range(args.burst)
    ]
    for n, body in enumerate(bodies):
        conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
        request_id = f"{args.run_id}-{n}"
        conn.request(
            "POST",
            "/infer/batch",
            body=body,
            headers={"Content-Type": "application/json", "X-Request-ID": request_id, **AUTH_HEADERS},
        )
        conns.append((conn, request_id, time.monotonic()))
    if args.ready_file:
        pathlib.Path(args.ready_file).touch()
    for conn, request_id, t0 in conns:
        status = error = None
        try:
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as ex:
            error = type(ex).__name__
        finally:
            conn.close()
        tally.record(request_id=request_id, sent_at=t0, run_started=started, status=status, error=error)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1", help="base URL (loopback only)")
    parser.add_argument("--run-id", default=f"load{int(time.time())}", help="X-Request-ID prefix")
    parser.add_argument("--duration", type=float, default=20.0, help="steady: seconds")
    parser.add_argument("--rate", type=float, default=40.0, help="steady: requests per second, total; 0: closed loop")
    parser.add_argument("--concurrency", type=int, default=4, help="steady: threads")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--burst", type=int, default=0, help="burst: number of batches in flight")
    parser.add_argument("--batch-size", type=int, default=50, help="burst: texts per batch")
    parser.add_argument("--chars", type=int, default=4000, help="burst: characters per text")
    parser.add_argument("--ready-file", help="burst: created once every request is sent")
    parser.add_argument("--out", help="also write the JSON summary here")
    parser.add_argument("--stop-file", help="steady: stop early once this file exists")
    parser.add_argument("--answered", help="write the request id of every 2xx answer here, one per line")
    parser.add_argument("--timeline", help="write one line per request: wall-clock send time, latency ms, status")
    args = parser.parse_args()

    url = urllib.parse.urlsplit(args.url)
    host = url.hostname or ""
    if host not in ALLOWED_HOSTS:
        parser.error(f"refusing to load {host!r}: loopback only")
    port = url.port or 80
    if not 0 < args.duration <= 600 or not 0 <= args.rate <= 5000 or not 0 <= args.burst <= 200:
        parser.error("bounded load only: duration <= 600 s, rate <= 5000/s, burst <= 200")
    if not 1 <= args.concurrency <= 32:
        parser.error("bounded load only: 1 to 32 connections")

    started = time.monotonic()
    tally = run_burst(args, host, port) if args.burst else run_steady(args, host, port)
    summary = tally.summary(run_id=args.run_id, seconds=time.monotonic() - started)
    text = json.dumps(summary, indent=2, sort_keys=True)
    if args.timeline:
        lines = (f"{sent:.6f} {ms:.3f} {status}\n" for sent, ms, status in sorted(tally.timeline))
        pathlib.Path(args.timeline).write_text("".join(lines))
    if args.answered:
        pathlib.Path(args.answered).write_text("".join(f"{request_id}\n" for request_id in sorted(tally.answered)))
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
