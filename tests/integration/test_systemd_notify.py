"""`falcon-svc serve` speaks systemd's notify protocol: a real datagram socket plays systemd.

What must hold: READY=1 only once a worker can answer (gunicorn's own READY=1 comes
before any worker has loaded the model), WATCHDOG=1 from the master's loop while it
runs and not while it hangs, STOPPING=1 on SIGTERM, and no READY=1 when start-up fails.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_gunicorn_serving import call, free_port, service_env, started_service

from falcon_svc.startup import EXIT_NO_MODEL

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 2_000_000  # pings every 2/3 s at most: a short test
WATCHDOG_SECONDS = WATCHDOG_USEC / 1e6

# NOTE: with this option the kernel stamps each datagram as it is queued, i.e. when
# the master sent it, so ping times do not depend on when this (busy) test process
# gets round to reading them. Linux's value (asm-generic/socket.h); Python does not name it.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
# Room for the few descriptors an FDSTORE=1 message may carry.
_RIGHTS_SPACE = socket.CMSG_SPACE(8 * 4)


@dataclass
class Message:
    # When the master sent it (kernel stamp, on time.time()'s clock).
    at: float
    fields: dict[str, str]
    # /readyz status when READY=1 arrived (None for other messages).
    readyz: int | None = None
    # Descriptors passed along (FDSTORE=1), now open in this process.
    fds: list[int] = field(default_factory=list)


@dataclass
class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET, as systemd would hold it."""

    sock: socket.socket
    path: Path
    messages: list[Message] = field(default_factory=list)

    def receive(self, timeout: float | None, port: int | None = None) -> Message | None:
        """Return the next message within ``timeout`` s (0: only one already queued); on READY=1 probe /readyz."""
        self.sock.settimeout(timeout)
        try:
            raw, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_TIMESPEC.size) + _RIGHTS_SPACE)
        except (TimeoutError, BlockingIOError):
            return None
        stamps = [data for level, kind, data in ancillary if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)]
        assert stamps, f"the kernel did not stamp the datagram: {ancillary}"
        seconds, nanoseconds = _TIMESPEC.unpack(stamps[0])
        fds = [
            fd
            for level, kind, data in ancillary
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            for fd in array.array("i", data[: len(data) - len(data) % 4])
        ]
        fields = dict(line.split("=", 1) for line in raw.decode().splitlines() if "=" in line)
        message = Message(seconds + nanoseconds / 1e9, fields, fds=fds)
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
        """Collect every message for ``seconds``, then every one already queued."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                got.append(message)
        return got + self.flush()

    def flush(self) -> list[Message]:
        """Take every message already queued, without waiting."""
        got = []
        while (message := self.receive(0)) is not None:
            got.append(message)
        return got


def wait_until_stopped(pid: int, within: float = 10.0) -> None:
    """Wait until the kernel reports ``pid`` stopped (a SIGSTOP takes effect asynchronously)."""
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop within {within} s"
        time.sleep(0.01)


def pings_per_window(messages: list[Message], start: float, windows: int) -> list[int]:
    """Count the WATCHDOG=1 pings sent in each of ``windows`` WATCHDOG_USEC-long windows from ``start``."""
    counts = [0] * windows
    for message in messages:
        index = int((message.at - start) // WATCHDOG_SECONDS)
        if message.fields.get("WATCHDOG") == "1" and 0 <= index < windows:
            counts[index] += 1
    return counts


@contextmanager
def bound_fake_systemd(path: Path) -> Iterator[FakeSystemd]:
    """Listen on ``path`` as systemd's NOTIFY_SOCKET would, until the block ends."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(str(path))
    try:
        yield FakeSystemd(sock, path)
    finally:
        sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    with bound_fake_systemd(tmp_path / "notify.sock") as fake:
        yield fake


def notify_env(model_dir: Path, port: int, tmp_path: Path, fake: FakeSystemd, **extra: str) -> dict[str, str]:
    return service_env(
        model_dir,
        port,
        tmp_path,
        **{"WORKER_CLASS": "sync", "NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": str(WATCHDOG_USEC), **extra},
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

        # The master pings while it runs: systemd wants one ping per WATCHDOG_USEC, and
        # the master sends one every WATCHDOG_USEC/3 to 1/2 (2 or 3 a window, by where it
        # cuts). Counted per window by send time, with room for a busy machine: at least
        # one a window; at least 3 in all (pings only every WATCHDOG_USEC make at most 2);
        # at most 3 + 1 a window (the +1: a ping sent late, right before a timely one).
        windows = 2
        start = time.time()
        counts = pings_per_window(fake_systemd.drain(windows * WATCHDOG_SECONDS), start, windows)
        assert min(counts) >= 1, f"a WATCHDOG_USEC window without a ping (systemd would kill us): {counts}"
        assert sum(counts) >= 3, f"pings too rare: {counts} per WATCHDOG_USEC window"
        assert max(counts) <= 4, f"pings more often than every WATCHDOG_USEC/3: {counts} per window"

        # A stopped (hung) master stops pinging: systemd would restart it.
        os.kill(process.pid, signal.SIGSTOP)
        try:
            wait_until_stopped(process.pid)
            stopped_at = time.time()
            fake_systemd.flush()  # sent before it stopped
            silent = [m for m in fake_systemd.drain(WATCHDOG_SECONDS * 1.5) if m.at >= stopped_at]
        finally:
            os.kill(process.pid, signal.SIGCONT)
        assert not silent, f"a stopped master still 'pinged': {[m.fields for m in silent]}"
        fake_systemd.wait_for("WATCHDOG", within=10)  # and pings again once it runs

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
    got = [m.fields for m in fake_systemd.flush()]  # it has exited: all it sent is queued
    assert not any("READY" in fields for fields in got), f"READY=1 sent by a service that failed to start: {got}"
