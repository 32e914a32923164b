"""`falcon-svc serve` speaks systemd's notify protocol: a real datagram socket plays systemd.

What must hold: READY=1 only once a worker can answer (gunicorn's own READY=1 comes
before any worker has loaded the model), WATCHDOG=1 from the master's loop while it
runs and not while it hangs, STOPPING=1 on SIGTERM, and no READY=1 when start-up fails.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_gunicorn_serving import call, free_port, service_env, started_service

from falcon_svc.app import EXIT_NO_MODEL

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 2_000_000  # pings every 2/3 s at most: a short test


@dataclass
class Message:
    at: float
    fields: dict[str, str]
    # /readyz status when READY=1 arrived (None for other messages).
    readyz: int | None = None


@dataclass
class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET, as systemd would hold it."""

    sock: socket.socket
    path: Path
    messages: list[Message] = field(default_factory=list)

    def receive(self, timeout: float, port: int | None = None) -> Message | None:
        """Return the next message within ``timeout`` s; on READY=1 probe /readyz at once."""
        self.sock.settimeout(timeout)
        try:
            raw = self.sock.recv(4096)
        except TimeoutError:
            return None
        at = time.monotonic()
        fields = dict(line.split("=", 1) for line in raw.decode().splitlines() if "=" in line)
        message = Message(at, fields)
        if port is not None and fields.get("READY") == "1":
            try:
                message.readyz = call(port, "GET", "/readyz", timeout=5)[0]
            except OSError:
                message.readyz = -1
        self.messages.append(message)
        return message

    def wait_for(self, key: str, within: float, port: int | None = None) -> Message:
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left, port)
            if message is not None and key in message.fields:
                return message
        raise AssertionError(f"no {key}= within {within} s; got {[m.fields for m in self.messages]}")

    def drain(self, seconds: float) -> list[Message]:
        """Collect every message for ``seconds``."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                got.append(message)
        return got


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield FakeSystemd(sock, path)
    finally:
        sock.close()


def notify_env(model_dir: Path, port: int, tmp_path: Path, fake: FakeSystemd, **extra: str) -> dict[str, str]:
    return service_env(
        model_dir,
        port,
        tmp_path,
        WORKER_CLASS="sync",
        NOTIFY_SOCKET=str(fake.path),
        WATCHDOG_USEC=str(WATCHDOG_USEC),
        **extra,
    )


def test_ready_watchdog_and_stopping(dummy_model_dir, tmp_path, fake_systemd):
    port = free_port()
    log_path = tmp_path / "service.log"
    with started_service(notify_env(dummy_model_dir, port, tmp_path, fake_systemd), log_path) as process:
        ready = fake_systemd.wait_for("READY", within=60, port=port)
        before_ready = [m.fields for m in fake_systemd.messages if m is not ready]
        assert ready.readyz == 200, (
            f"READY=1 came before a worker could answer (/readyz {ready.readyz}); {log_path.read_text()[-2000:]}"
        )
        assert "serving on" in ready.fields.get("STATUS", ""), ready.fields
        assert not any("READY" in fields for fields in before_ready), f"an early READY=1: {before_ready}"

        # The master pings while it runs, well inside WATCHDOG_USEC.
        pings = [m.at for m in fake_systemd.drain(3.0) if m.fields.get("WATCHDOG") == "1"]
        assert len(pings) >= 3, f"expected a ping every <= 1 s for 3 s, got {len(pings)}"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < WATCHDOG_USEC / 1e6 * 0.75, f"watchdog pings too far apart: {gaps}"
        assert min(gaps) > WATCHDOG_USEC / 1e6 / 3 * 0.8, f"watchdog pings more often than WATCHDOG_USEC/3: {gaps}"

        # A stopped (hung) master stops pinging: systemd would restart it.
        os.kill(process.pid, signal.SIGSTOP)
        try:
            fake_systemd.drain(0.3)  # a ping already in flight
            silent = fake_systemd.drain(WATCHDOG_USEC / 1e6 * 1.5)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        assert not silent, f"a stopped master still 'pinged': {[m.fields for m in silent]}"
        fake_systemd.wait_for("WATCHDOG", within=WATCHDOG_USEC / 1e6)

        process.send_signal(signal.SIGTERM)
        fake_systemd.wait_for("STOPPING", within=10)
        assert process.wait(timeout=30) == 0, f"a SIGTERM stop must exit 0: {log_path.read_text()[-2000:]}"


def test_sighup_reloads_between_reloading_and_ready(dummy_model_dir, tmp_path, fake_systemd):
    port = free_port()
    with started_service(
        notify_env(dummy_model_dir, port, tmp_path, fake_systemd), tmp_path / "service.log"
    ) as process:
        fake_systemd.wait_for("READY", within=60, port=port)
        process.send_signal(signal.SIGHUP)
        fake_systemd.wait_for("RELOADING", within=10)
        ready = fake_systemd.wait_for("READY", within=60, port=port)
        assert ready.readyz == 200, f"READY=1 after reload, but /readyz said {ready.readyz}"


def test_no_ready_when_the_model_is_missing(dummy_model_dir, tmp_path, fake_systemd):
    env = notify_env(dummy_model_dir, free_port(), tmp_path, fake_systemd, MODEL_DIR=str(tmp_path / "no-model"))
    log_path = tmp_path / "service.log"
    with started_service(env, log_path) as process:
        assert process.wait(timeout=60) == EXIT_NO_MODEL, log_path.read_text()[-2000:]
    got = [m.fields for m in fake_systemd.drain(0.2)]
    assert not any("READY" in fields for fields in got), f"READY=1 sent by a service that failed to start: {got}"
