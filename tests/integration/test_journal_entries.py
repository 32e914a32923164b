"""`falcon-svc serve` under systemd writes journal entries: a real datagram socket plays journald.

The child gets what systemd would give it: JOURNAL_STREAM naming its stdout
(here a file), and the socket's path (FALCON_JOURNAL_SOCKET, read for tests only).
Each entry's sender pid comes from the kernel (SO_PASSCRED), as journald's _PID does.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from test_gunicorn_serving import call, free_port, running_service, service_env, worker_pids

from falcon_svc.journal import JOURNAL_SOCKET_OVERRIDE_ENV, decode_entry

pytestmark = pytest.mark.integration

_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass
class Entry:
    pid: int
    fields: dict[str, str]


@dataclass
class FakeJournald:
    """journald's socket, read by a thread as journald would, so the child's sends never find it full."""

    sock: socket.socket
    path: str
    entries: list[Entry] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        while True:
            try:
                raw, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(_CREDENTIALS.size))
            except OSError:
                return  # closed: the test is over
            pids = [_CREDENTIALS.unpack(data)[0] for level, kind, data in ancillary if kind == socket.SCM_CREDENTIALS]
            with self.arrived:
                self.entries.append(Entry(pids[0] if pids else -1, decode_entry(raw)))
                self.arrived.notify_all()

    def wait_for(self, within: float, **wanted: str) -> Entry:
        """Return the first entry whose fields include ``wanted``, waiting up to ``within`` s."""
        deadline = time.monotonic() + within
        with self.arrived:
            while True:
                for entry in self.entries:
                    if wanted.items() <= entry.fields.items():
                        return entry
                left = deadline - time.monotonic()
                assert left > 0, f"no entry with {wanted} in {within} s; got {[e.fields for e in self.entries]}"
                self.arrived.wait(left)


@contextmanager
def fake_journald() -> Iterator[FakeJournald]:
    # A short directory of its own: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="jd") as directory:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        path = os.path.join(directory, "socket")
        sock.bind(path)
        journald = FakeJournald(sock, path)
        reader = threading.Thread(target=journald.run, daemon=True)
        reader.start()
        try:
            yield journald
        finally:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            reader.join(5)


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "meinheld"])
def test_entries_carry_priority_identifier_and_the_fields_journalctl_filters_on(
    dummy_model_dir, tmp_path, worker_class
):
    port = free_port()
    log_path = tmp_path / "service.log"
    log_path.touch()
    stdout = log_path.stat()
    with fake_journald() as journald:
        env = service_env(
            dummy_model_dir,
            port,
            tmp_path,
            WORKER_CLASS=worker_class,
            JOURNAL_STREAM=f"{stdout.st_dev}:{stdout.st_ino}",
            **{JOURNAL_SOCKET_OVERRIDE_ENV: journald.path},
        )
        with running_service(env, log_path) as master:
            status, headers, body = call(port, "POST", "/infer", {"text": ""})
            assert status == 422, body
            refused_id = headers["X-Request-ID"]
            status, headers, _ = call(port, "POST", "/infer", {"text": "fine"})
            assert status == 200
            served_id = headers["X-Request-ID"]

            refused = journald.wait_for(30, REQUEST_ID=refused_id, SYSLOG_IDENTIFIER="falcon-access")
            served = journald.wait_for(30, REQUEST_ID=served_id)
            # Service with Redis unreachable: each worker warns as it builds the app.
            warning = journald.wait_for(30, LOGGER="falcon_svc.dependencies")
            workers = worker_pids(master.pid)
            booted = journald.wait_for(30, LOGGER="gunicorn.error")

    line = json.loads(refused.fields["MESSAGE"])
    assert (line["status"], line["code"], line["field"]) == (422, "invalid_input", "text"), line
    assert refused.fields["STATUS"] == "422" and refused.fields["ERROR_CODE"] == "invalid_input"
    assert refused.fields["PRIORITY"] == "6" and refused.fields["ROUTE"] == "/infer"
    assert refused.fields["WORKER"] == line["worker"] and refused.pid in workers

    assert served.fields["SYSLOG_IDENTIFIER"] == "falcon-access" and served.fields["STATUS"] == "200"
    assert served.fields["MODEL_VERSION"] == json.loads(served.fields["MESSAGE"])["model_version"]
    assert "ERROR_CODE" not in served.fields

    assert warning.fields["PRIORITY"] == "4", warning.fields
    assert warning.fields["SYSLOG_IDENTIFIER"] == "falcon-svc" and "Redis unreachable" in warning.fields["MESSAGE"]
    assert warning.pid != master.pid, "the warning should come from a worker"

    # gunicorn's own lines (logconfig_dict in gunicorn_conf) are journal entries too, sent by the master.
    assert booted.fields["SYSLOG_IDENTIFIER"] == "falcon-svc" and booted.pid == master.pid

    # An entry journald took is not written to stdout as well.
    stdout_text = log_path.read_text()
    assert refused_id not in stdout_text and served_id not in stdout_text, stdout_text[-2000:]
