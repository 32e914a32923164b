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
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import stop_process

from falcon_svc.startup import EXIT_CONFIG, EXIT_NO_MODEL

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(
    port: int,
    method: str,
    path: str,
    body: object | None = None,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
):
    """Return (status, headers, decoded JSON or text) for one request."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
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


def worker_pids(master_pid: int) -> list[int]:
    """Return the pids of a gunicorn master's workers (its children), from /proc."""
    return [int(pid) for pid in Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()]


def unread_bytes(server_port: int, client_port: int) -> int | None:
    """Return the bytes the server end of a loopback connection has not read yet, or None if not found.

    /proc/net/tcp lists each socket's receive queue: 0 on the server's end means the
    worker has taken everything the client sent (so a request held half-sent is in
    the worker's hands, not in the kernel's).
    """
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{server_port:04X}") and fields[2].endswith(f":{client_port:04X}"):
            return int(fields[4].split(":")[1], 16)
    return None


class RawConnection:
    """One HTTP/1.1 keep-alive connection on a plain socket: requests can be held half sent.

    A draining worker stops accepting connections, so whatever a test asks it after
    SIGTERM must go over a connection it accepted before.
    """

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    @staticmethod
    def head(method: str, path: str, content_length: int | None = None) -> bytes:
        """Return the request line and headers of one request (a JSON body when content_length is given)."""
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        if content_length is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {content_length}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, dict[str, str], object]:
        """Send one whole request and return its (status, lower-cased headers, JSON body)."""
        data = json.dumps(body).encode() if body is not None else b""
        self.send(self.head(method, path, len(data) if body is not None else None) + data)
        return self.read_response()

    def read_response(self) -> tuple[int, dict[str, str], object]:
        """Read one response with a Content-Length body (what every route here sends)."""
        while b"\r\n\r\n" not in self._buffer:
            self._receive()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            self._receive()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return int(status_line.split()[1]), headers, json.loads(body) if body else None

    def wait_until_read(self, within: float = 10.0) -> None:
        """Wait until the server has read everything sent so far on this connection."""
        client_port = self.sock.getsockname()[1]
        deadline = time.monotonic() + within
        while (left := unread_bytes(self.port, client_port)) != 0:
            assert time.monotonic() < deadline, f"the worker left {left} bytes unread for {within} s"
            time.sleep(0.01)

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer += chunk


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


def readyz_once_draining(conn: RawConnection, within: float = 15.0) -> tuple[int, object]:
    """Ask /readyz on ``conn`` until it stops answering 200; return that answer.

    NOTE: SIGTERM reaches the worker's Python handler a moment after kill()
    returns (gthread runs it when its main loop wakes), so the first answers may
    still be 200; each is asked at once after the last, well inside the 2 s a
    stopping gthread worker keeps a kept-alive connection.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            status, headers, body = conn.request("GET", "/readyz")
        except ConnectionError as ex:
            raise AssertionError("the signalled worker dropped the connection while /readyz still said 200") from ex
        if status != 200:
            return status, body
        assert headers.get("connection", "").lower() != "close", (
            "the worker is stopping (it closes the connection) yet /readyz said 200"
        )
        assert time.monotonic() < deadline, f"/readyz still says 200 {within} s after SIGTERM: {body}"
        time.sleep(0.02)


@pytest.mark.parametrize("worker_class", ["meinheld", "gthread"])
def test_sigterm_turns_readiness_503_while_the_in_flight_request_completes(dummy_model_dir, tmp_path, worker_class):
    """README "Drain": SIGTERM turns /readyz to 503 at once, and in-flight requests finish.

    One worker, so both connections belong to the worker that gets SIGTERM: one holds
    a request whose body is half uploaded (in flight), the other asks /readyz.
    (sync workers serve one connection at a time: nothing could ask meanwhile.)
    """
    port = free_port()
    log_path = tmp_path / "service.log"
    env = service_env(dummy_model_dir, port, tmp_path, WORKERS="1", WORKER_CLASS=worker_class)
    body = json.dumps({"text": "a slow upload of a long and friendly text " * 40}).encode()
    with running_service(env, log_path) as master:
        probe, upload = RawConnection(port), RawConnection(port)
        try:
            # The first answer on each connection names the worker that accepted it.
            answers = [conn.request("POST", "/infer", {"text": "who serves me?"}) for conn in (probe, upload)]
            assert [status for status, _, _ in answers] == [200, 200], answers
            worker_id = answers[0][2]["worker_id"]
            victim = int(worker_id.rsplit(":", 1)[1])
            assert answers[1][2]["worker_id"] == worker_id and worker_pids(master.pid) == [victim], answers
            # Half the body: the worker has read it and waits for the rest.
            upload.send(RawConnection.head("POST", "/infer", len(body)) + body[: len(body) // 2])
            upload.wait_until_read()

            os.kill(victim, signal.SIGTERM)
            status, readiness = readyz_once_draining(probe)
            assert status == 503 and "draining" in readiness["reasons"], (status, readiness)

            upload.send(body[len(body) // 2 :])
            status, _, reply = upload.read_response()
            assert status == 200, f"the in-flight request was cut by the drain: {status} {reply}"
            assert reply["worker_id"] == worker_id, f"answered by {reply['worker_id']}, not the draining {worker_id}"
        finally:
            probe.close()
            upload.close()
        # Its connections closed, the drained worker exits and the master replaces it.
        deadline = time.monotonic() + 30
        while victim in worker_pids(master.pid) or not worker_pids(master.pid):
            assert time.monotonic() < deadline, "the drained worker did not exit"
            time.sleep(0.1)
    assert f"Worker exiting (pid: {victim})" in log_path.read_text(), "the drained worker did not exit cleanly"


def test_metrics_add_up_across_workers(dummy_model_dir, tmp_path):
    """Multiprocess mode: /metrics counts every worker's requests, whichever worker answers."""
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync")
    at_least, at_most, concurrency = 40, 400, 4

    def infer(i: int) -> str:
        status, _, body = call(port, "POST", "/infer", {"text": f"text {i}"})
        assert status == 200, body
        return body["worker_id"]

    answered_by: list[str] = []
    with running_service(env, tmp_path / "service.log"), ThreadPoolExecutor(concurrency) as pool:
        # NOTE: the kernel may hand one worker every sequential request; concurrent
        # ones reach both. Send until both have answered (and at least 40).
        while len(answered_by) < at_least or (len(set(answered_by)) < 2 and len(answered_by) < at_most):
            answered_by += pool.map(infer, range(len(answered_by), len(answered_by) + concurrency))
        _, _, metrics = call(port, "GET", "/metrics")
    workers = Counter(answered_by)
    assert len(workers) == 2, f"{len(answered_by)} requests all went to {workers}: the sum proves nothing"
    line = 'falcon_http_requests_total{method="POST",route="/infer",status="200"}'
    counted = [row for row in metrics.splitlines() if row.startswith(line)]
    assert counted and float(counted[0].split()[-1]) == len(answered_by), f"{counted} (answered by {workers})"
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


def test_meinheld_missing_exits_78_with_one_line(dummy_model_dir, tmp_path):
    # A package named meinheld that fails to import stands in for one not installed.
    shadow = tmp_path / "shadow" / "meinheld"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'meinheld' (test)\")\n")
    env = service_env(dummy_model_dir, free_port(), tmp_path, WORKER_CLASS="meinheld")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    returncode, output = serve_expecting_exit(env)
    assert returncode == EXIT_CONFIG, output
    assert "meinheld is not installed" in output and "Traceback" not in output, output


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
