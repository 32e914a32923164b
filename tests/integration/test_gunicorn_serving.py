"""The service as gunicorn runs it: real processes on free loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import stop_process

from falcon_svc.app import EXIT_CONFIG, EXIT_NO_MODEL

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(port: int, method: str, path: str, body: object | None = None, timeout: float = 10.0):
    """Return (status, headers, decoded JSON or text) for one request."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as ex:
        status, headers, raw = ex.code, ex.headers, ex.read()
    text = raw.decode()
    return status, headers, json.loads(text) if headers.get("Content-Type", "").startswith("application/json") else text


def service_env(model_dir: Path, port: int, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        BIND=f"127.0.0.1:{port}",
        MODEL_DIR=str(model_dir),
        WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        INSTANCE_NAME="itest",
        # Free ports with nothing listening: the service must serve degraded.
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        DATABASE_URL=f"postgresql://falcon@127.0.0.1:{free_port()}/falcon",
        LOG_SPOOL_DIR=str(tmp_path / "spool"),
    )
    env.update(extra)
    return env


@contextmanager
def started_service(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Start `falcon-svc serve` (waiting for nothing) and always stop it: SIGTERM, then SIGKILL."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "falcon_svc.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        try:
            yield process
        finally:
            stop_process(process)


@contextmanager
def running_service(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Start `falcon-svc serve`, wait for /readyz, and always stop it."""
    with started_service(env, log_path) as process:
        port = int(env["BIND"].rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"service exited {process.returncode}: {log_path.read_text()[-3000:]}"
            try:
                if call(port, "GET", "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"service not ready in 60 s: {log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield process


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "meinheld"])
def test_serves_with_each_worker_class(dummy_model_dir, tmp_path, worker_class):
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS=worker_class)
    with running_service(env, tmp_path / "service.log") as process:
        status, _, body = call(port, "POST", "/infer", {"text": "I really like this"})
        assert status == 200, body
        assert body["worker_id"].startswith("itest:")
        status, _, body = call(port, "POST", "/infer/batch", {"texts": ["a good day", "a bad day"]})
        assert status == 200 and body["count"] == 2, body
        status, _, body = call(port, "POST", "/infer", {"text": "   "})
        assert status == 422 and body["error"]["field"] == "text", body
        status, _, body = call(port, "GET", "/nope")
        assert status == 404 and body["error"]["code"] == "not_found", body
        status, _, body = call(port, "GET", "/readyz")
        assert status == 200 and "redis" in body["degraded"], body
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, "a SIGTERM stop must exit 0"
    # gunicorn silently swaps "sync" for gthread when threads > 1: check what ran.
    expected = {
        "sync": "falcon_svc.gunicorn_workers.SyncWorker",
        "gthread": "falcon_svc.gunicorn_workers.ThreadWorker",
        "meinheld": "falcon_svc.workers.MeinheldWorker",
    }[worker_class]
    assert f"Using worker: {expected}" in (tmp_path / "service.log").read_text()


def test_metrics_add_up_across_workers(dummy_model_dir, tmp_path):
    """Multiprocess mode: /metrics counts every worker's requests, whichever worker answers."""
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync")
    requests = 40
    with running_service(env, tmp_path / "service.log"):
        workers = {call(port, "POST", "/infer", {"text": f"text {i}"})[2]["worker_id"] for i in range(requests)}
        _, _, metrics = call(port, "GET", "/metrics")
    line = 'falcon_http_requests_total{method="POST",route="/infer",status="200"}'
    counted = [row for row in metrics.splitlines() if row.startswith(line)]
    assert counted and float(counted[0].split()[-1]) == requests, f"{counted} (answered by {workers})"
    assert "falcon_model_info{" in metrics


def test_access_log_is_one_json_line_per_request(dummy_model_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "service.log"
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync")
    with running_service(env, log_path):
        _, headers, _ = call(port, "POST", "/infer", {"text": "log me"})
        request_id = headers["X-Request-ID"]
        time.sleep(0.5)
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    mine = [entry for entry in entries if entry.get("request_id") == request_id]
    assert len(mine) == 1, f"expected one access line for {request_id}, got {mine}"
    assert {"route", "status", "latency_ms", "worker"} <= set(mine[0])
    assert mine[0]["route"] == "/infer" and mine[0]["status"] == 200


def test_serves_degraded_without_redis_and_says_so(dummy_model_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "service.log"
    with running_service(service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync"), log_path):
        assert call(port, "POST", "/infer", {"text": "still serving"})[0] == 200
    assert "DEGRADED: Redis unreachable" in log_path.read_text()


def serve_expecting_exit(env: dict[str, str]) -> tuple[int, str]:
    """Run `falcon-svc serve` that must stop at start; return its exit code and output."""
    result = subprocess.run(
        [sys.executable, "-m", "falcon_svc.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("setting", "value", "code", "message"),
    [
        ("WORKERS", "lots", EXIT_CONFIG, "WORKERS='lots' is not an integer"),
        ("MODEL_DIR", "/nonexistent/model", EXIT_NO_MODEL, "cannot load the model"),
    ],
)
def test_fatal_start_up_problem_exits_with_its_code(dummy_model_dir, tmp_path, setting, value, code, message):
    """One clear log line and a distinct exit code, so systemd does not restart-loop."""
    returncode, output = serve_expecting_exit(service_env(dummy_model_dir, free_port(), tmp_path, **{setting: value}))
    assert returncode == code, output
    assert message in output


def test_dead_workers_series_do_not_linger(dummy_model_dir, tmp_path):
    """Multiprocess cleanup: a killed worker's live gauges leave /metrics with it."""
    port = free_port()
    with running_service(service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync"), tmp_path / "log") as master:
        children = Path(f"/proc/{master.pid}/task/{master.pid}/children")
        deadline = time.monotonic() + 30
        # /readyz answers once one worker is up; wait for both before choosing.
        while len(workers := children.read_text().split()) < 2:
            assert time.monotonic() < deadline, "the second worker never booted"
            time.sleep(0.1)
        victim = int(workers[0])
        deadline = time.monotonic() + 10
        while f'pid="{victim}"' not in call(port, "GET", "/metrics")[2]:
            assert time.monotonic() < deadline, "the live gauge should carry each worker's pid"
            time.sleep(0.1)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            alive = children.read_text().split()
            if len(alive) == len(workers) and str(victim) not in alive:
                break
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        metrics = call(port, "GET", "/metrics")[2]
    lines = [line for line in metrics.splitlines() if line.startswith("falcon_worker_start_time_seconds")]
    assert lines, "falcon_worker_start_time_seconds is missing"
    assert not any(f'pid="{victim}"' in line for line in lines), f"dead worker {victim} lingers: {lines}"
