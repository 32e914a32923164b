"""The whole service under gunicorn with real Redis and PostgreSQL: outages, hangs, restarts, drains.

What must hold: every request that got a 200 has exactly one row in request_log,
whatever PostgreSQL and the workers did meanwhile; requests in flight when
SIGTERM arrives complete with 200; a hung Redis costs a request no more than the
Redis timeouts the README states, and the service notices when it is back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import PostgresServer, free_port
from test_gunicorn_serving import REPO_ROOT, RawConnection, call, running_service, service_env, worker_pids

from falcon_svc.requestlog.migrate import apply_migrations
from falcon_svc.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IDEMPOTENCY_KEY = "X-Idempotency-Key"


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    directory = tmp_path / "pg"
    directory.mkdir()
    server = PostgresServer(directory)
    server.init()
    apply_migrations(server.dsn)
    yield server
    server.resume()  # a test that failed while PostgreSQL was paused: pg_ctl cannot stop it paused
    server.destroy()


def full_env(model_dir: Path, port: int, tmp_path: Path, redis_server, postgres, **extra: str) -> dict[str, str]:
    env = service_env(model_dir, port, tmp_path, **extra)
    # A short breaker pause, so recovery fits in a test; 60 s in production.
    env.update(
        REDIS_URL=redis_server.url,
        DATABASE_URL=postgres.dsn,
        LOG_FLUSH_INTERVAL_MS="50",
        CIRCUIT_BREAKER_TIMEOUT_SECONDS="2",
    )
    return env


def redis_env(model_dir: Path, port: int, tmp_path: Path, redis_server) -> dict[str, str]:
    """One worker of the default class with Redis and the README's defaults, but a 2 s breaker pause."""
    env = service_env(
        model_dir,
        port,
        tmp_path,
        WORKERS="1",
        REDIS_URL=redis_server.url,
        REQUEST_LOG_ENABLED="false",
        CIRCUIT_BREAKER_TIMEOUT_SECONDS="2",
    )
    # NOTE: the defaults must be the service's own (this shell may set some): a
    # default raised in settings.py must make these tests fail.
    for key in ("WORKER_CLASS", "REDIS_TIMEOUT_MS", "CIRCUIT_BREAKER_FAILURE_THRESHOLD", "CACHE_REDIS_MIN_CHARS"):
        env.pop(key, None)
    return env


def logged_ids(postgres: PostgresServer) -> list[str]:
    with psycopg.connect(postgres.dsn) as conn:
        return [row[0] for row in conn.execute("SELECT request_id FROM request_log")]


def wait_for_rows(postgres: PostgresServer, expected: set[str], within: float) -> list[str]:
    """Poll request_log until every id in ``expected`` has a row, or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        try:
            ids = logged_ids(postgres)
        except psycopg.OperationalError:
            ids = []
        if expected <= set(ids) or time.monotonic() > deadline:
            return ids
        time.sleep(0.25)


def rows_by_request_id(postgres: PostgresServer, request_ids: list[str]) -> list[tuple[str, str]]:
    """Return (request_id, log_id) of every row logged for ``request_ids``."""
    with psycopg.connect(postgres.dsn) as conn:
        query = "SELECT request_id, log_id FROM request_log WHERE request_id = ANY(%s)"
        return [(row[0], row[1]) for row in conn.execute(query, [request_ids])]


def metric_value(port: int, sample: str, **labels: str) -> float | None:
    """Return one sample of the service's /metrics (all workers), or None when absent."""
    status, _, text = call(port, "GET", "/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(key) == value for key, value in labels.items()):
                return found.value
    return None


def readme_redis_timeout_seconds() -> float:
    """Return the timeout the README promises for Redis calls on the request path."""
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    match = re.search(r"Redis calls on the request path use (\d+) ms timeouts", readme)
    assert match, "README.md no longer states the Redis timeout on the request path"
    return int(match[1]) / 1000.0


# At most three Redis calls lie on a request's path: the idempotency claim, the cache
# read and storing the response (cache writes go from a background thread).
REDIS_CALLS_PER_REQUEST = 3
# What a noisy, shared 2-core machine may add to a request on top of those timeouts.
MARGIN_SECONDS = 1.5


def long_text(tag: str) -> str:
    """Return a text long enough that the cache asks Redis about it (CACHE_REDIS_MIN_CHARS)."""
    text = f"{tag}: the room was quiet and clean, and the staff were friendly and quick to help. " * 6
    assert len(text) >= Settings().cache_redis_min_chars
    return text


class Load:
    """Send requests from a thread until stopped; remember what each got."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok: list[str] = []
        self.failed: list[tuple[int, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                status, _, body = call(self.port, "POST", "/infer", {"text": f"load text number {i}"}, timeout=10)
            except OSError as ex:  # a restarting worker may refuse a connection: not a 200
                self.failed.append((0, repr(ex)))
                continue
            if status == 200:
                self.ok.append(body["request_id"])
            else:
                self.failed.append((status, body))

    def wait_for_answers(self, more: int, within: float = 30.0) -> None:
        """Wait until ``more`` further requests have been answered 200: this phase really had traffic."""
        target = len(self.ok) + more
        deadline = time.monotonic() + within
        while len(self.ok) < target:
            assert time.monotonic() < deadline, f"only {len(self.ok)} of {target} answered; failures {self.failed[-3:]}"
            time.sleep(0.05)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)


def test_postgres_outage_and_worker_restart_lose_no_log_row(dummy_model_dir, tmp_path, redis_server, postgres):
    port = free_port()
    env = full_env(dummy_model_dir, port, tmp_path, redis_server, postgres, WORKER_CLASS="sync")
    with running_service(env, tmp_path / "service.log") as master:
        with Load(port) as load:
            load.wait_for_answers(20)
            postgres.stop()
            load.wait_for_answers(20)
            # A worker restarted during the outage: it spools its queue on SIGTERM,
            # and a live worker replays that spool once PostgreSQL is back.
            os.kill(worker_pids(master.pid)[0], signal.SIGTERM)
            load.wait_for_answers(20)
            postgres.start()
            load.wait_for_answers(20)
        assert load.ok, f"no request succeeded; failures: {load.failed[:5]}"
        ids = wait_for_rows(postgres, set(load.ok), within=40)
    missing = set(load.ok) - set(ids)
    assert not missing, (
        f"{len(missing)} of {len(load.ok)} answered requests have no log row (e.g. {sorted(missing)[:3]})"
    )
    print(f"outage: {len(load.ok)} answered 200, {len(load.failed)} failed, {len(ids)} rows, {len(set(ids))} distinct")
    assert len(ids) == len(set(ids)), "a request was logged twice"
    assert set(ids) == set(load.ok), "rows exist for requests that did not get a 200"


def test_sigterm_to_a_worker_drains_in_flight_requests_and_flushes_the_log(
    dummy_model_dir, tmp_path, redis_server, postgres
):
    port = free_port()
    log_path = tmp_path / "service.log"
    env = full_env(dummy_model_dir, port, tmp_path, redis_server, postgres, WORKER_CLASS="meinheld")
    # Long texts make each batch take a while, so they are in flight when SIGTERM lands.
    texts = [" ".join(f"word{i}x{j} great awful" for j in range(220)) for i in range(50)]
    results: list[tuple[int, object]] = []
    first_done = threading.Event()

    def send_batch() -> None:
        try:
            status, _, body = call(port, "POST", "/infer/batch", {"texts": texts}, timeout=30)
        except OSError as ex:
            results.append((0, repr(ex)))
            return
        results.append((status, body["request_id"] if status == 200 else body))
        first_done.set()

    held_body = json.dumps({"text": "held in flight across the SIGTERM " * 30}).encode()
    with running_service(env, log_path) as master:
        held = RawConnection(port)
        try:
            # The worker that answers this connection's first request owns it: that one gets SIGTERM.
            status, _, first = held.request("POST", "/infer", {"text": "which worker holds this connection?"})
            assert status == 200, first
            worker_id = first["worker_id"]
            draining = int(worker_id.rsplit(":", 1)[1])
            assert draining in worker_pids(master.pid)
            # 12 batches of ~60 ms each on 2 workers: when the first is answered, the
            # others are in the workers' hands or the listen backlog.
            senders = [threading.Thread(target=send_batch) for _ in range(12)]
            for sender in senders:
                sender.start()
            assert first_done.wait(20), "no batch was answered"
            # Half a request on the held connection, read by the worker: in flight for sure.
            held.send(RawConnection.head("POST", "/infer", len(held_body)) + held_body[: len(held_body) // 2])
            held.wait_until_read()
            # NOTE: SIGTERM to one worker, as gunicorn's HUP and systemd's rolling
            # restarts do: its in-flight requests must finish, the listen socket stays
            # open and the other worker takes the backlog. (A master stopping closes
            # the socket, and nginx retries what sat in the backlog.)
            os.kill(draining, signal.SIGTERM)
            held.send(held_body[len(held_body) // 2 :])
            held_status, _, held_reply = held.read_response()
        finally:
            held.close()
        for sender in senders:
            sender.join(30)
        assert held_status == 200, f"the request in flight at SIGTERM was cut: {held_status} {held_reply}"
        assert held_reply["worker_id"] == worker_id, f"answered by {held_reply['worker_id']}, not {worker_id}"
        answered = {request_id for status, request_id in results if status == 200} | {held_reply["request_id"]}
        ids = wait_for_rows(postgres, answered, within=20)
        deadline = time.monotonic() + 30
        while draining in worker_pids(master.pid):
            assert time.monotonic() < deadline, "the signalled worker did not exit"
            time.sleep(0.1)
    assert [status for status, _ in results] == [200] * 12, f"in-flight requests were cut: {results}"
    assert answered <= set(ids), "the log buffer was not flushed on SIGTERM"
    assert f"Worker exiting (pid: {draining})" in log_path.read_text(), "the signalled worker did not exit cleanly"


def test_postgres_slow_does_not_slow_requests(dummy_model_dir, tmp_path, redis_server, postgres):
    port = free_port()
    env = full_env(dummy_model_dir, port, tmp_path, redis_server, postgres, WORKER_CLASS="sync")
    with running_service(env, tmp_path / "service.log"):
        with psycopg.connect(postgres.dsn) as blocker:
            blocker.execute("LOCK TABLE request_log IN ACCESS EXCLUSIVE MODE")
            answered = []
            for i in range(50):
                started = time.monotonic()
                status, _, body = call(port, "POST", "/infer", {"text": f"while locked {i}"}, timeout=5)
                answered.append((status, time.monotonic() - started, body.get("request_id")))
            # Generous bound: the lock is held for the whole loop, so a request
            # that waited for PostgreSQL would take the whole 5 s timeout.
            assert all(status == 200 for status, _, _ in answered), answered[:3]
            slowest = max(seconds for _, seconds, _ in answered)
            print(f"table locked: {len(answered)} requests, slowest {slowest * 1000:.1f} ms")
            assert slowest < 2.0, "a request waited for the locked table"
            blocker.rollback()
        ids = wait_for_rows(postgres, {request_id for _, _, request_id in answered}, within=20)
    assert {request_id for _, _, request_id in answered} <= set(ids)


def test_postgres_hung_leaves_requests_alone_and_every_row_lands_once(
    dummy_model_dir, tmp_path, redis_server, postgres
):
    """PostgreSQL paused (SIGSTOP, every backend too): requests unaffected; rows wait, then land once each."""
    port = free_port()
    # A small buffer, so the rows of a short hang fill it and reach the spool as well.
    env = full_env(dummy_model_dir, port, tmp_path, redis_server, postgres, WORKERS="1", LOG_BUFFER_MAX="8")
    sent = [f"pg-hung-{i}" for i in range(30)]
    with running_service(env, tmp_path / "service.log"):
        status, _, _ = call(port, "POST", "/infer", {"text": "before the hang"}, headers={"X-Request-ID": "pg-warm"})
        assert status == 200
        assert "pg-warm" in wait_for_rows(postgres, {"pg-warm"}, within=20), "the writer never wrote a row"
        postgres.pause()
        try:
            for i, request_id in enumerate(sent):
                status, _, body = call(
                    port, "POST", "/infer", {"text": f"while postgres hangs {i}"}, headers={"X-Request-ID": request_id}
                )
                assert status == 200 and body["request_id"] == request_id, (status, body)
            status, _, readiness = call(port, "GET", "/readyz")
            assert status == 200, f"a hung request log must not make the worker unready: {readiness}"
            held = readiness["request_log"]
            assert held["queue_depth"] > 0 and held["spool_bytes"] > 0, f"rows neither buffered nor spooled: {held}"
        finally:
            postgres.resume()
        ids = wait_for_rows(postgres, set(sent), within=60)
        assert set(sent) <= set(ids), f"rows lost after the hang: {sorted(set(sent) - set(ids))[:5]}"
    rows = rows_by_request_id(postgres, sent)
    twice = {request_id: n for request_id, n in Counter(request_id for request_id, _ in rows).items() if n != 1}
    assert not twice, f"rows stored more than once: {twice}"
    log_ids = [log_id for _, log_id in rows]
    assert len(set(log_ids)) == len(rows) and not {request_id for request_id, _ in rows} & set(log_ids), (
        "each row needs a log_id of its own, not the client's request id"
    )


def test_redis_hung_costs_requests_only_its_timeouts_opens_the_breaker_and_recovers(
    dummy_model_dir, tmp_path, redis_server
):
    """Redis paused (SIGSTOP): connects succeed and nothing answers, the worst case for a client."""
    port = free_port()
    bound = REDIS_CALLS_PER_REQUEST * readme_redis_timeout_seconds() + MARGIN_SECONDS
    with running_service(redis_env(dummy_model_dir, port, tmp_path, redis_server), tmp_path / "service.log"):
        status, headers, _ = call(port, "POST", "/infer", {"text": long_text("warm")}, headers={IDEMPOTENCY_KEY: "w"})
        assert status == 200 and "Idempotency-Status" not in headers, "Redis should be in use before the hang"
        redis_server.pause()
        slowest = 0.0
        try:
            for i in range(10):
                started = time.monotonic()
                status, headers, body = call(
                    port, "POST", "/infer", {"text": long_text(f"hung {i}")}, timeout=60,
                    headers={IDEMPOTENCY_KEY: f"hung-{i}"},
                )  # fmt: skip
                seconds = time.monotonic() - started
                slowest = max(slowest, seconds)
                assert status == 200, body
                assert headers.get("Idempotency-Status") == "unavailable", "Redis was not on this request's path"
                assert seconds <= bound, (
                    f"request {i} took {seconds:.2f} s with Redis hung: more than {REDIS_CALLS_PER_REQUEST} calls "
                    f"at the README's Redis timeout plus {MARGIN_SECONDS} s ({bound:.2f} s)"
                )
            print(f"redis hung: 10 requests, slowest {slowest * 1000:.1f} ms (bound {bound * 1000:.0f} ms)")
            status, _, readiness = call(port, "GET", "/readyz")
            assert status == 200 and "redis" in readiness["degraded"], readiness
            assert readiness["dependencies"]["redis"]["circuit"] in {"open", "half_open"}, readiness
            opened = metric_value(
                port, "falcon_circuit_breaker_transitions_total", dependency="redis", to_state="open"
            )  # fmt: skip
            assert opened and opened >= 1, f"the Redis breaker never opened ({opened})"
        finally:
            redis_server.resume()
        # Back: the breaker lets a trial through within its 2 s pause, and keys are honoured again.
        deadline = time.monotonic() + 30
        attempt = 0
        while True:
            attempt += 1
            key, body = f"back-{attempt}", {"text": long_text(f"back {attempt}")}
            status, headers, first = call(port, "POST", "/infer", body, headers={IDEMPOTENCY_KEY: key})
            assert status == 200, first
            if "Idempotency-Status" not in headers:
                break
            assert time.monotonic() < deadline, "Redis never came back into use after SIGCONT"
            time.sleep(0.2)
        status, headers, replay = call(port, "POST", "/infer", body, headers={IDEMPOTENCY_KEY: key})
        assert headers.get("Idempotent-Replayed") == "true" and replay == first, "the key was not stored in Redis"
        status, _, readiness = call(port, "GET", "/readyz")
        assert readiness["degraded"] == [] and readiness["dependencies"]["redis"]["circuit"] == "closed", readiness
        assert metric_value(port, "falcon_dependency_up", dependency="redis") == 1


def test_redis_back_clears_degraded_without_any_request_using_redis(dummy_model_dir, tmp_path, redis_server):
    """RUNBOOK "FalconRedisUnhealthy": once Redis is back, the worker says so, even if no request uses Redis.

    Short texts never ask Redis (CACHE_REDIS_MIN_CHARS), so only the worker's own
    trial calls can close the breaker.
    """
    port = free_port()
    with running_service(redis_env(dummy_model_dir, port, tmp_path, redis_server), tmp_path / "service.log"):
        redis_server.stop()
        # Requests that use Redis until the breaker opens. NOTE: short texts with a key:
        # the claim is their one Redis call, and no cache write is left pending that
        # could reach Redis once it is back.
        deadline = time.monotonic() + 30
        for attempt in range(1, 1000):
            status, headers, body = call(
                port, "POST", "/infer", {"text": "gone"}, headers={IDEMPOTENCY_KEY: f"{attempt}"}
            )
            assert status == 200 and headers.get("Idempotency-Status") == "unavailable", (status, body)
            status, _, readiness = call(port, "GET", "/readyz")
            if readiness["dependencies"]["redis"]["circuit"] == "open":
                break
            assert time.monotonic() < deadline, f"the breaker did not open: {readiness}"
        assert "redis" in readiness["degraded"], readiness
        redis_server.start()
        deadline = time.monotonic() + 30
        while True:
            status, _, body = call(port, "POST", "/infer", {"text": "short and sweet"})
            assert status == 200, body
            status, _, readiness = call(port, "GET", "/readyz")
            if "redis" not in readiness["degraded"]:
                break
            assert time.monotonic() < deadline, f"Redis is back but the worker still reports it down: {readiness}"
            time.sleep(0.2)
        assert readiness["dependencies"]["redis"] == {"healthy": True, "circuit": "closed"}, readiness
        assert metric_value(port, "falcon_dependency_up", dependency="redis") == 1, "FalconRedisUnhealthy stays on"


def test_request_log_row_shape(dummy_model_dir, tmp_path, redis_server, postgres):
    port = free_port()
    # One worker: its rows are written in the order it answered.
    env = full_env(
        dummy_model_dir,
        port,
        tmp_path,
        redis_server,
        postgres,
        WORKER_CLASS="sync",
        WORKERS="1",
        LOG_TEXT_HMAC_KEY="k" * 32,
    )
    with running_service(env, tmp_path / "service.log"):
        _, _, single = call(port, "POST", "/infer", {"text": "A lovely quiet room"})
        _, _, batch = call(port, "POST", "/infer/batch", {"texts": ["one", "two"]})
        # Probes are never logged; the 422 after them is, so its row shows the writer got past them.
        for path in ("/healthz", "/readyz", "/metrics"):
            call(port, "GET", path)
        status, headers, _ = call(port, "POST", "/infer", {"text": " "}, headers={"X-Request-ID": "shape-invalid"})
        assert status == 422 and headers["X-Request-ID"] == "shape-invalid"
        expected = {single["request_id"], batch["request_id"], "shape-invalid"}
        ids = wait_for_rows(postgres, expected, within=20)
        assert expected <= set(ids), f"rows missing: {expected - set(ids)}"
    with psycopg.connect(postgres.dsn) as conn:
        rows = {
            row[0]: row
            for row in conn.execute(
                "SELECT request_id, route, status, label, n_texts, text_length, text_hmac, text, log_id "
                "FROM request_log"
            )
        }
    assert len(rows) == 3, f"probes must not be logged, errors must: {json.dumps(list(rows.values()), default=str)}"
    one = rows[single["request_id"]]
    assert one[1:6] == ("/infer", 200, single["label"], 1, len("A lovely quiet room")), one
    assert len(one[6]) == 64 and one[7] is None, "raw text is stored only with LOG_REQUEST_TEXT=true"
    assert rows[batch["request_id"]][4] == 2
    assert rows["shape-invalid"][1:3] == ("/infer", 422), "a 4xx must be logged too"
    log_ids = {row[8] for row in rows.values()}
    assert len(log_ids) == 3 and not log_ids & set(rows), "each row is keyed by a log_id of its own"
