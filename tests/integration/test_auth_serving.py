"""API keys on a real gunicorn master over real sockets: 401s, reloads on SIGHUP, per-client idempotency.

Issue 11, findings 11 (API keys) and 8 (idempotency keys were global: client B
sending client A's key and body got A's stored answer).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import RedisServer
from test_gunicorn_serving import call, free_port, running_service, serve_expecting_exit, service_env, worker_pids

from falcon_svc.auth.keys import KeyRecord, generate_key, key_sha256, write_key_file

pytestmark = pytest.mark.integration
TEXT = {"text": "The delivery was quick and the staff were lovely."}
CHALLENGE = 'Bearer realm="falcon-svc"'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_keys(path: Path, *keys: str) -> None:
    write_key_file(path, [KeyRecord(key.split("_")[1], key_sha256(key)) for key in keys])


def infer_status(port: int, key: str | None) -> int:
    return call(port, "POST", "/infer", TEXT, headers=bearer(key) if key else None)[0]


def wait_for(what: str, condition, log: Path, within: float = 60.0) -> None:
    """Poll ``condition`` until true: the reload's end is what the test synchronises on."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def replaced(master_pid: int, before: set[int], workers: int = 2):
    """Return a condition: every worker of ``before`` is gone and ``workers`` new ones run."""

    def condition() -> bool:
        now = set(worker_pids(master_pid))
        return len(now) == workers and not now & before

    return condition


@contextmanager
def steady_traffic(port: int, key: str, threads: int = 3) -> Iterator[list[str]]:
    """Send authenticated /infer requests without pause while the block runs; yield the failures seen."""
    failures: list[str] = []
    sent = [0]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                status, _, body = call(port, "POST", "/infer", TEXT, headers=bearer(key), timeout=30)
            except OSError as ex:
                failures.append(f"{type(ex).__name__}: {ex}")
                continue
            sent[0] += 1
            if status != 200:
                failures.append(f"{status}: {body}")

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield failures
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    assert sent[0] > 0, "the steady traffic sent nothing: the test proved nothing"


@pytest.mark.parametrize("worker_class", ["sync", "meinheld"])
def test_api_keys_over_a_real_socket_and_reloads_on_sighup(dummy_model_dir, tmp_path, worker_class):
    key_a, key_b, key_c = generate_key("client-a"), generate_key("client-b"), generate_key("client-c")
    keys_file = tmp_path / "api_keys"
    write_keys(keys_file, key_a)
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS=worker_class, API_KEYS_FILE=str(keys_file))
    log = tmp_path / "service.log"
    with running_service(env, log) as master:
        # No key, a key with another scheme, a wrong key: 401 in our error shape, with the challenge.
        status, headers, body = call(port, "POST", "/infer", TEXT)
        assert status == 401 and headers["WWW-Authenticate"] == CHALLENGE, (status, dict(headers), body)
        assert body["error"]["code"] == "unauthorized", body
        assert "X-Client-Key-Id" not in headers
        status, headers, _ = call(port, "POST", "/infer", TEXT, headers={"Authorization": "Basic YTpi"})
        assert status == 401 and headers["WWW-Authenticate"] == CHALLENGE
        for wrong in (key_b, key_a[:-2], "fsk_client-a_" + "x" * 43, "not-a-key"):
            status, headers, _ = call(port, "POST", "/infer", TEXT, headers=bearer(wrong))
            assert status == 401, wrong
            assert headers["WWW-Authenticate"] == f'{CHALLENGE}, error="invalid_token"'
        status, headers, body = call(port, "POST", "/infer", TEXT, headers=bearer(key_a))
        assert status == 200 and headers["X-Client-Key-Id"] == "client-a", (status, body)
        status, _, body = call(port, "POST", "/infer/batch", {"texts": ["a", "b"]})
        assert status == 401, body
        # Probes and scrapes stay open.
        assert call(port, "GET", "/healthz")[0] == 200
        assert call(port, "GET", "/readyz")[0] == 200
        assert call(port, "GET", "/metrics")[0] == 200

        # Add B and reload: B is accepted once the new workers serve, A never fails meanwhile.
        with steady_traffic(port, key_a) as failures:
            write_keys(keys_file, key_a, key_b)
            master.send_signal(signal.SIGHUP)
            wait_for("client-b accepted after SIGHUP", lambda: infer_status(port, key_b) == 200, log)
        assert failures == [], f"requests with a valid key failed during the reload: {failures[:5]}"

        # Revoke A and reload: A is refused, B never fails meanwhile.
        with steady_traffic(port, key_b) as failures:
            write_keys(keys_file, key_b)
            master.send_signal(signal.SIGHUP)
            wait_for("client-a refused after SIGHUP", lambda: infer_status(port, key_a) == 401, log)
        assert failures == [], f"requests with a valid key failed during the reload: {failures[:5]}"

        # A file that does not parse whole: nothing of it applies (C stays out), B stays in.
        keys_file.write_text(f"client-c {key_sha256(key_c)}\nclient-b\n")
        before = set(worker_pids(master.pid))
        master.send_signal(signal.SIGHUP)
        wait_for("the workers replaced after SIGHUP", replaced(master.pid, before), log)
        assert infer_status(port, key_b) == 200, log.read_text()[-3000:]
        assert infer_status(port, key_c) == 401
        assert master.poll() is None
    output = log.read_text()
    assert "API key file not reloaded" in output and f"{keys_file}:2" in output, output[-3000:]
    for key in (key_a, key_b, key_c):
        secret = key.split("_", 2)[2]
        assert secret not in output, "an API key reached the service's output"
    assert "Bearer" not in output, "an Authorization header reached the service's output"


def test_a_bad_key_file_stops_the_start_with_exit_78(dummy_model_dir, tmp_path):
    keys_file = tmp_path / "api_keys"
    key = generate_key("client-a")
    keys_file.write_text(f"client-a {key}\n")  # the key pasted where its hash belongs
    env = service_env(dummy_model_dir, free_port(), tmp_path, API_KEYS_FILE=str(keys_file))
    code, output = serve_expecting_exit(env)
    assert code == 78, output
    assert f"{keys_file}:1" in output and key.split("_", 2)[2] not in output, output


def test_idempotency_keys_are_scoped_per_client(dummy_model_dir, tmp_path, redis_server: RedisServer):
    key_a, key_b = generate_key("client-a"), generate_key("client-b")
    keys_file = tmp_path / "api_keys"
    write_keys(keys_file, key_a, key_b)
    port = free_port()
    env = service_env(
        dummy_model_dir, port, tmp_path, API_KEYS_FILE=str(keys_file), REDIS_URL=redis_server.url, WORKERS="1"
    )
    same = {"X-Idempotency-Key": "order-42"}
    with running_service(env, tmp_path / "service.log"):
        status, first, body_a = call(port, "POST", "/infer", TEXT, headers={**bearer(key_a), **same})
        assert status == 200 and first.get("Idempotent-Replayed") is None, (status, body_a)
        status, replay, _ = call(port, "POST", "/infer", TEXT, headers={**bearer(key_a), **same})
        assert status == 200 and replay.get("Idempotent-Replayed") == "true", "A's own retry must be replayed"
        assert replay["X-Request-ID"] == first["X-Request-ID"]
        # B, with A's key and body: its own request, computed, never A's stored answer.
        status, other, body_b = call(port, "POST", "/infer", TEXT, headers={**bearer(key_b), **same})
        assert status == 200, body_b
        assert other.get("Idempotent-Replayed") is None, "client B got client A's stored answer"
        assert other["X-Request-ID"] != first["X-Request-ID"]
        assert other["X-Client-Key-Id"] == "client-b"
