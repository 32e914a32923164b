"""Run real gunicorn masters with our meinheld worker, and with meinheld's own for contrast.

Each test starts ``python -m gunicorn`` on a free 127.0.0.1 port with one worker
serving ``apps/sleepy_app.py``, and kills its whole process group when done. Timings
are only ever bounded generously: the point is what happens, not how fast.

Tests named ``test_upstream_defect_*`` prove that the stock
``meinheld.gmeinheld.MeinheldWorker`` still has the defects falcon_svc.workers works
around. If one of them fails, meinheld has changed: re-read falcon_svc/workers.py.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[2]
APPS_DIR = Path(__file__).resolve().parent / "apps"

OUR_WORKER = "falcon_svc.workers.MeinheldWorker"
STOCK_WORKER = "meinheld.gmeinheld.MeinheldWorker"

# Our worker's minimum (falcon_svc.workers.MIN_TIMEOUT_SECONDS): short enough for
# quick tests, long enough that an idle worker's 1 s heartbeat has a wide margin.
TIMEOUT = 3
BOOT_SECONDS = 20.0
REPLACE_SECONDS = 20.0


@dataclass
class Gunicorn:
    """One gunicorn master started by a test, and what it wrote to its log."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    @property
    def master_alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET one path on a fresh connection; return the status and the body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def worker_pid(self, timeout: float = 5.0) -> int:
        status, body = self.get("/pid", timeout=timeout)
        assert status == 200, f"/pid answered {status}: {body!r}"
        return int(body)

    def wait_for_worker_other_than(self, old_pid: int, within: float = REPLACE_SECONDS) -> int:
        """Poll /pid until a worker other than ``old_pid`` answers; return its pid."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.master_alive, f"master died (code {self.proc.returncode}):\n{self.log()}"
            try:
                pid = self.worker_pid(timeout=max(0.5, deadline - time.monotonic()))
            except (OSError, http.client.HTTPException):
                time.sleep(0.2)
                continue
            if pid != old_pid:
                return pid
            time.sleep(0.2)
        pytest.fail(f"worker {old_pid} was not replaced within {within} s:\n{self.log()}")

    def kill_group(self) -> None:
        """SIGKILL the master and its workers (their own process group), and reap the master."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log_file.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def gunicorn_masters(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Start gunicorn masters on demand; kill every one of them on the way out."""
    started: list[Gunicorn] = []

    def start(
        worker_class: str = OUR_WORKER,
        *,
        timeout: int = TIMEOUT,
        graceful_timeout: int = 10,
        keepalive: int = 1,
        boot_gate: Path | None = None,
        config: Path | None = None,
        nofile_limit: int | None = None,
        worker_connections: int | None = None,
    ) -> Gunicorn:
        """Start a master; return once a worker serves, or, with a boot gate, once it listens.

        With ``boot_gate``, every worker waits while loading the app until that file exists.
        ``config`` is a gunicorn config file (for hooks); ``nofile_limit`` caps
        RLIMIT_NOFILE for the master and so its workers, as systemd's LimitNOFILE= does.
        """
        port = _free_port()
        log_path = tmp_path / f"gunicorn-{port}.log"
        env = {key: value for key, value in os.environ.items() if key != "GUNICORN_CMD_ARGS"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["SLEEPY_APP_MARK_DIR"] = str(tmp_path)
        if boot_gate is not None:
            env["SLEEPY_APP_BOOT_GATE"] = str(boot_gate)
        # NOTE: prlimit(1) rather than a preexec_fn, which is unsafe while the test has threads.
        limit = ["prlimit", f"--nofile={nofile_limit}:{nofile_limit}", "--"] if nofile_limit else []
        command = [
            *limit,
            sys.executable, "-m", "gunicorn",
            "--chdir", str(APPS_DIR),
            "--bind", f"127.0.0.1:{port}",
            "--workers", "1",
            "--worker-class", worker_class,
            "--timeout", str(timeout),
            "--graceful-timeout", str(graceful_timeout),
            "--keep-alive", str(keepalive),
            "--no-control-socket",
            "--log-level", "info",
            *(["--config", str(config)] if config is not None else []),
            *(["--worker-connections", str(worker_connections)] if worker_connections else []),
            "sleepy_app:app",
        ]  # fmt: skip
        log_file = log_path.open("wb")
        # NOTE: a session of its own, so teardown can SIGKILL the master and every
        # worker (hung ones included) through the master's process group id.
        proc = subprocess.Popen(
            command, cwd=APPS_DIR, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        server = Gunicorn(proc, port, log_path, log_file)
        started.append(server)
        deadline = time.monotonic() + BOOT_SECONDS
        while time.monotonic() < deadline:
            assert server.master_alive, f"gunicorn exited at start (code {proc.returncode}):\n{server.log()}"
            if boot_gate is not None:
                if "Listening at:" in server.log():
                    return server
                time.sleep(0.05)
                continue
            try:
                server.worker_pid(timeout=1.0)
                return server
            except (OSError, http.client.HTTPException):
                time.sleep(0.1)
        pytest.fail(f"gunicorn did not serve within {BOOT_SECONDS} s:\n{server.log()}")

    try:
        yield start
    finally:
        for server in started:
            server.kill_group()


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Start gunicorn masters on demand; kill every one of them at teardown."""
    with gunicorn_masters(tmp_path) as start:
        yield start


def _in_background(call: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``call`` in a daemon thread; its result or exception lands in the dict."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except Exception as ex:  # the test inspects whatever happened
            outcome["error"] = ex

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        time.sleep(0.05)


def _assert_hung_worker_replaced(
    server: Gunicorn, master_pid: int, hung_pid: int, hung_request: threading.Thread
) -> None:
    """The arbiter timed the hung worker out, replaced it, and kept its own pid."""
    assert server.master_alive and server.proc.pid == master_pid, f"master changed or died:\n{server.log()}"
    assert server.get("/fast") == (200, "ok"), "the replacement worker does not serve"
    assert f"WORKER TIMEOUT (pid:{hung_pid})" in server.log(), (
        f"the arbiter did not time out the worker:\n{server.log()}"
    )
    _wait_for(lambda: not _pid_alive(hung_pid), within=10, what=f"hung worker {hung_pid} to be gone")
    hung_request.join(timeout=10)


# --- our worker ----------------------------------------------------------------


@pytest.mark.parametrize("route", ["/hang", "/spin"], ids=["blocked-in-sleep", "busy-loop"])
def test_hung_worker_is_killed_at_timeout_and_replaced(
    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path, route: str
) -> None:
    server = start_gunicorn(timeout=TIMEOUT)
    master_pid = server.proc.pid
    hung_pid = server.worker_pid()

    hung_request, outcome = _in_background(lambda: server.get(route, timeout=60))
    _wait_for((tmp_path / f"{route[1:]}.started").exists, within=10, what=f"{route} to start")
    new_pid = server.wait_for_worker_other_than(hung_pid)

    _assert_hung_worker_replaced(server, master_pid, hung_pid, hung_request)
    assert "result" not in outcome, f"the hung request was answered, so nothing hung: {outcome}"
    assert new_pid != hung_pid


def test_worker_hung_by_its_first_request_is_killed_at_timeout_and_replaced(
    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    """A request can hang before meinheld ever calls the watchdog; the timeout must still hold.

    meinheld's first loop turn accepts the connections already queued and runs their
    requests at once, before its first watchdog call: the worker must have heartbeat
    before serving, or the arbiter never times it out.
    """
    gate = tmp_path / "boot.gate"
    server = start_gunicorn(timeout=TIMEOUT, boot_gate=gate)
    master_pid = server.proc.pid

    # Queue /hang in the listen backlog while the worker is still held at the gate.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/hang", headers={"Connection": "close"})
    gate.touch()
    hung_request, outcome = _in_background(lambda: conn.getresponse().read())
    mark = tmp_path / "hang.started"
    _wait_for(mark.exists, within=BOOT_SECONDS, what="/hang to start")
    hung_pid = int(mark.read_text())
    new_pid = server.wait_for_worker_other_than(hung_pid)

    _assert_hung_worker_replaced(server, master_pid, hung_pid, hung_request)
    conn.close()
    assert "result" not in outcome, f"the hung request was answered, so nothing hung: {outcome}"
    assert new_pid != hung_pid


def test_sigkilled_worker_is_replaced_and_master_survives(start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(timeout=30)
    master_pid = server.proc.pid
    killed_pid = server.worker_pid()

    os.kill(killed_pid, signal.SIGKILL)
    server.wait_for_worker_other_than(killed_pid)

    assert server.get("/fast") == (200, "ok"), "the replacement worker does not serve"
    assert server.master_alive and server.proc.pid == master_pid, f"master died:\n{server.log()}"
    assert f"Worker (pid:{killed_pid}) was sent SIGKILL" in server.log(), "the master did not log the death"
    assert "Traceback" not in server.log(), f"the master logged a traceback:\n{server.log()}"


def test_idle_worker_keeps_heartbeating(start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(timeout=TIMEOUT)
    pid = server.worker_pid()

    time.sleep(2 * TIMEOUT + 1)  # idle, well past the timeout

    assert server.worker_pid() == pid, f"the idle worker was replaced:\n{server.log()}"
    assert "WORKER TIMEOUT" not in server.log(), f"the arbiter timed out an idle worker:\n{server.log()}"


def test_sigterm_to_master_drains_a_request_in_flight(start_gunicorn: Callable[..., Gunicorn], tmp_path: Path) -> None:
    server = start_gunicorn(timeout=30, graceful_timeout=10)
    started = tmp_path / "slow.started"

    slow_request, outcome = _in_background(lambda: server.get("/slow", timeout=20))
    _wait_for(started.exists, within=10, what="/slow to start")
    server.proc.send_signal(signal.SIGTERM)
    slow_request.join(timeout=20)

    assert outcome.get("result") == (200, "slow ok"), f"in-flight request not drained: {outcome}\n{server.log()}"
    assert server.proc.wait(timeout=20) == 0, f"master did not exit cleanly:\n{server.log()}"


def test_sigterm_closes_keepalive_connections_after_their_next_response(
    start_gunicorn: Callable[..., Gunicorn],
) -> None:
    # nginx reuses its keep-alive connections to a worker; a draining worker that kept
    # them open would go on taking requests until the load stopped and never exit.
    server = start_gunicorn(timeout=30, graceful_timeout=20, keepalive=15)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/pid")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        assert (first.getheader("Connection") or "").lower() == "keep-alive"

        server.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: "Handling signal: term" in server.log(), within=10, what="the master to get SIGTERM")
        # The worker's Python signal handler runs at its loop's next Python call (the
        # once-a-second watchdog, or a request), so ask until the drain shows.
        connection_header = "keep-alive"
        for _ in range(10):
            time.sleep(0.5)
            conn.request("GET", "/pid")
            response = conn.getresponse()
            response.read()
            assert response.status == 200, f"request on a kept-alive connection during the drain: {response.status}"
            connection_header = (response.getheader("Connection") or "").lower()
            if connection_header == "close":
                break
        assert connection_header == "close", f"still keep-alive 5 s into the drain:\n{server.log()}"
    finally:
        conn.close()
    assert server.proc.wait(timeout=20) == 0, f"master did not exit cleanly:\n{server.log()}"


def _upload_slowly(server: Gunicorn, on_half_sent: Callable[[], None], pause: float) -> tuple[int, str]:
    """POST /echo on a connection the worker has already served: half the body, a pause, the rest."""
    body = b"x" * 1000
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        # NOTE: a first request on the same connection proves the worker accepted it;
        # a connection still in the listen backlog is not in flight, and is lost.
        conn.request("GET", "/fast")
        assert conn.getresponse().read() == b"ok"
        conn.putrequest("POST", "/echo")
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Connection", "close")
        conn.endheaders(message_body=body[:500])
        on_half_sent()
        time.sleep(pause)
        conn.send(body[500:])
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


# Longer than the one second meinheld's own SIGTERM handler leaves in-flight requests.
UPLOAD_PAUSE = 2.5


def test_sigterm_drains_a_request_still_being_uploaded(start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(timeout=30, graceful_timeout=10, keepalive=10)

    status, body = _upload_slowly(server, lambda: server.proc.send_signal(signal.SIGTERM), UPLOAD_PAUSE)

    assert (status, body) == (200, "1000"), f"upload in flight not drained: {status} {body!r}\n{server.log()}"
    assert server.proc.wait(timeout=20) == 0, f"master did not exit cleanly:\n{server.log()}"


def _listen_socket_inode(port: int) -> int:
    """The inode of the socket listening on 127.0.0.1:port, from /proc/net/tcp."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
            return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _epoll_watched_inodes(pid: int) -> set[int]:
    """The inodes of every file in the epoll interest lists of a process (its fdinfo)."""
    inodes: set[int] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "anon_inode:[eventpoll]":
                for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                    if line.startswith("tfd:"):
                        inodes.add(int(line.split("ino:")[1].split()[0], 16))
    return inodes


def test_a_worker_stopped_inside_its_accept_loop_drains_and_lets_go_of_the_port(
    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    """SIGTERM while meinheld's accept loop runs a request: what it accepted is served, no more.

    meinheld accepts up to 8 queued connections in a row and runs each request as it
    goes, so the worker's SIGTERM handler (which stops the server and closes the
    worker's copy of the listen socket) can run inside that loop. Our build 1.0.2+falcon.2
    then accepted again on the closed socket, stopped the server a second time and
    ended its loop with requests in flight: 3 reloads in 25 reset a client. And the
    socket, closed before picoev's deferred epoll deletion, stayed in the draining
    worker's epoll (EPOLLEXCLUSIVE), taking wake-ups meant for the other workers.
    """
    gate = tmp_path / "boot.gate"
    # keepalive also times the first bytes of a connection: long enough for the test.
    server = start_gunicorn(timeout=30, graceful_timeout=20, keepalive=10, boot_gate=gate)
    listen_inode = _listen_socket_inode(server.port)

    # Queued while the worker boots, in this order: a request whose head is not all
    # there yet (accepted, then waited on), then /slow (run inside the accept loop).
    partial = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    partial.sendall(b"GET /fast HTTP/1.1\r\nHost: test\r\n")
    slow = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        slow.request("GET", "/slow", headers={"Connection": "close"})
        gate.touch()
        mark = tmp_path / "slow.started"
        _wait_for(mark.exists, within=BOOT_SECONDS, what="/slow to start")
        draining_pid = int(mark.read_text())
        # A reload: the master starts a new worker, then sends the old one SIGTERM,
        # well within /slow's second.
        server.proc.send_signal(signal.SIGHUP)
        slow_response = slow.getresponse()
        assert (slow_response.status, slow_response.read()) == (200, b"slow ok"), server.log()
    finally:
        slow.close()

    # The partial request keeps the worker draining: it must be alive, out of the
    # port's epoll wake-ups, and a replacement must serve new connections meanwhile.
    assert _pid_alive(draining_pid), f"the worker ended its drain with a request in flight:\n{server.log()}"
    assert listen_inode not in _epoll_watched_inodes(draining_pid), "the draining worker still watches the port"
    assert server.wait_for_worker_other_than(draining_pid) != draining_pid

    with partial:
        partial.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := partial.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), f"{answer!r}\n{server.log()}"
    _wait_for(lambda: not _pid_alive(draining_pid), within=10, what="the drained worker to exit")
    assert "Bad file descriptor" not in server.log(), server.log()


# --- the stock meinheld worker: upstream defects ---------------------------------


def test_upstream_defect_stock_worker_crashes_master_when_a_worker_dies(
    start_gunicorn: Callable[..., Gunicorn],
) -> None:
    """UPSTREAM DEFECT (meinheld 1.0.2): patching Logger.error kills the master on a worker death."""
    server = start_gunicorn(STOCK_WORKER, timeout=30)

    os.kill(server.worker_pid(), signal.SIGKILL)

    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"stock meinheld's master survived a worker SIGKILL: meinheld changed?\n{server.log()}")
    assert "unexpected keyword argument 'exc_info'" in server.log(), f"master died another way:\n{server.log()}"


def test_upstream_defect_stock_worker_hung_worker_is_never_killed(
    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    """UPSTREAM DEFECT (meinheld 1.0.2): its heartbeat moves ctime, so --timeout never fires."""
    server = start_gunicorn(STOCK_WORKER, timeout=2)
    hung_pid = server.worker_pid()

    _in_background(lambda: server.get("/hang", timeout=60))
    _wait_for((tmp_path / "hang.started").exists, within=10, what="/hang to start")
    time.sleep(3 * 2 + 1)  # three timeouts and then some

    assert _pid_alive(hung_pid), f"stock meinheld's hung worker was killed: meinheld changed?\n{server.log()}"
    assert "WORKER TIMEOUT" not in server.log(), f"stock meinheld's worker timed out: meinheld changed?\n{server.log()}"
    with pytest.raises(TimeoutError):
        server.get("/pid", timeout=1)  # still hung, and nobody took its place


def test_upstream_defect_stock_worker_cuts_off_requests_one_second_after_sigterm(
    start_gunicorn: Callable[..., Gunicorn],
) -> None:
    """UPSTREAM DEFECT (meinheld 1.0.2): its C SIGTERM handler ignores graceful_timeout."""
    server = start_gunicorn(STOCK_WORKER, timeout=30, graceful_timeout=10, keepalive=10)
    signalled: list[bool] = []

    def terminate() -> None:
        server.proc.send_signal(signal.SIGTERM)
        signalled.append(True)

    with pytest.raises((OSError, http.client.HTTPException)):
        _upload_slowly(server, terminate, UPLOAD_PAUSE)
    assert signalled, "the upload failed before SIGTERM was sent, so this proves nothing"
