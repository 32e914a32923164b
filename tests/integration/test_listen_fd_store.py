"""A restart keeps the port listening: the master gives its socket to systemd's fd store and takes it back.

systemd is played twice over: by a datagram socket that receives ``FDSTORE=1`` with
the descriptor (``FakeSystemd``), and by this test, which holds that descriptor while
no master runs and starts the next one as systemd would: the socket as fd 3,
``LISTEN_FDS=1``, ``LISTEN_PID`` its own pid. What must hold: a request sent while no
master runs is queued, not refused, and answered by the next master; a handed-back
socket bound elsewhere than BIND is dropped (``FDSTOREREMOVE=1``) and BIND is bound.
The unit side (systemd keeps the store across a restart and empties it on a stop)
is proven on a real systemd by the e2e drills (scripts/faults/restart_storm.sh).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gunicorn_serving import REPO_ROOT, call, free_port
from test_systemd_notify import FakeSystemd, bound_fake_systemd, notify_env

pytestmark = pytest.mark.integration

INFER = b'{"text": "queued while no master was running"}'


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    with bound_fake_systemd(tmp_path / "notify.sock") as fake:
        yield fake


def start_handed_back(env: dict[str, str], fd: int, log_path: Path) -> subprocess.Popen:
    """Start `falcon-svc serve` the way systemd hands back a stored socket: fd 3, LISTEN_FDS, LISTEN_PID."""
    # NOTE: LISTEN_PID must be the service's own pid, known only once it runs: a small
    # launcher moves the socket to fd 3, sets it to its own pid and execs the service.
    launcher = (
        "import os, sys; fd = int(sys.argv[1]); fd != 3 and (os.dup2(fd, 3), os.close(fd)); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='listen', LISTEN_PID=str(os.getpid())); "
        "os.execv(sys.executable, [sys.executable, '-m', 'falcon_svc.cli', 'serve'])"
    )
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", launcher, str(fd)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            pass_fds=(fd,),
        )


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def send_infer(port: int) -> socket.socket:
    """Connect and send one POST /infer; return the socket, to read the answer later."""
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    client.sendall(
        b"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(INFER)}\r\n\r\n".encode()
        + INFER
    )
    return client


def read_status(client: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = client.recv(4096)
        assert chunk, f"closed before a status line: {data!r}"
        data += chunk
    return int(data.split(b" ", 2)[1])


def first_master(env: dict[str, str], fake: FakeSystemd, log_path: Path) -> int:
    """Run a master until READY=1 and its FDSTORE=1, stop it; return the stored descriptor (now ours)."""
    port = int(env["BIND"].rsplit(":", 1)[1])
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "falcon_svc.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )  # fmt: skip
    try:
        stored = fake.wait_for("FDSTORE", within=60)
        fake.wait_for("READY", within=60, port=port)
    finally:
        assert stop(process) == 0, log_path.read_text()[-2000:]
    assert stored.fields.get("FDNAME") == "listen", stored.fields
    assert len(stored.fds) == 1, f"FDSTORE=1 must carry the listening socket: {stored.fds}"
    return stored.fds[0]


def test_a_request_sent_between_two_masters_is_queued_and_answered(dummy_model_dir, tmp_path, fake_systemd):
    port = free_port()
    env = notify_env(dummy_model_dir, port, tmp_path, fake_systemd, WORKER_CLASS="meinheld")
    log_path = tmp_path / "service.log"
    fd = first_master(env, fake_systemd, log_path)
    try:
        with socket.socket(fileno=os.dup(fd)) as stored:
            assert stored.getsockname() == ("127.0.0.1", port)
        # No master runs now; systemd (this test) still holds the socket.
        queued = send_infer(port)
        process = start_handed_back(env, fd, log_path)
        try:
            assert read_status(queued) == 200, log_path.read_text()[-3000:]
            assert call(port, "GET", "/readyz")[0] == 200
        finally:
            queued.close()
            assert stop(process) == 0, log_path.read_text()[-2000:]
    finally:
        os.close(fd)
    log = log_path.read_text()
    assert "listening socket handed back by systemd" in log, log[-3000:]
    resent = [m for m in fake_systemd.flush() if "FDSTORE" in m.fields]
    assert not resent, "a handed-back socket is already in the store: it must not be stored again"


def test_a_handed_back_socket_on_another_address_is_dropped(dummy_model_dir, tmp_path, fake_systemd):
    port = free_port()
    env = notify_env(dummy_model_dir, port, tmp_path, fake_systemd, WORKER_CLASS="sync")
    log_path = tmp_path / "service.log"
    with socket.socket() as elsewhere:
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen()
        fd = os.dup(elsewhere.fileno())
    try:
        process = start_handed_back(env, fd, log_path)
        try:
            removed = fake_systemd.wait_for("FDSTOREREMOVE", within=60)
            assert removed.fields.get("FDNAME") == "listen"
            stored = fake_systemd.wait_for("FDSTORE", within=60)
            assert len(stored.fds) == 1
            with socket.socket(fileno=stored.fds[0]) as fresh:
                assert fresh.getsockname() == ("127.0.0.1", port), "BIND, not the handed-back address"
            fake_systemd.wait_for("READY", within=60, port=port)
            assert call(port, "GET", "/readyz")[0] == 200
        finally:
            assert stop(process) == 0, log_path.read_text()[-2000:]
    finally:
        os.close(fd)
    assert "BIND is" in log_path.read_text()
