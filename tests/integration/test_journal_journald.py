"""The operator's journalctl recipes against a REAL systemd-journald and a real `falcon-svc serve`.

journald runs in a private mount namespace (``unshare -m``) with fresh tmpfs over
/run/systemd, /run/log and /var/log/journal, so the host's journal is never
touched; ``systemd-cat`` connects the service's stdout to journald's stream
socket as systemd does for a unit, and JOURNAL_STREAM names it, as systemd sets
it. ``journalctl`` then runs inside the namespace (``nsenter -m``). Needs root
(mounts), so it is skipped elsewhere; the e2e host runs the same recipes for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import stop_process
from test_gunicorn_serving import REPO_ROOT, call, free_port, service_env, worker_pids

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0
        or not all(shutil.which(tool) for tool in ("unshare", "nsenter", "systemd-cat", "journalctl"))
        or not Path("/lib/systemd/systemd-journald").exists()
        or not all(Path(path).is_dir() for path in ("/run/systemd", "/run/log", "/var/log/journal"))
        or not Path("/etc/systemd/journald.conf").is_file(),
        reason="needs root, util-linux's unshare/nsenter and systemd-journald",
    ),
]

# Inside the namespace: journald on fresh tmpfs, then the service with its stdout on
# journald's stream socket. Nothing is created outside the tmpfs mounts.
_NAMESPACE_SCRIPT = """
set -e
for dir in /run/systemd /run/log /var/log/journal; do mount -t tmpfs tmpfs "$dir"; done
mkdir -p /run/systemd/journal
# Not the host's kernel log: no reading /dev/kmsg, journald's own messages to stderr (discarded).
printf '[Journal]\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n' > /run/systemd/journald.conf
mount --bind /run/systemd/journald.conf /etc/systemd/journald.conf
# A subshell: journald must not be a child of the gunicorn master (as one it did not survive).
(SYSTEMD_LOG_TARGET=console /lib/systemd/systemd-journald </dev/null >/dev/null 2>&1 & echo $! > "$1")
until [ -S /run/systemd/journal/stdout ] && [ -S /run/systemd/journal/socket ]; do sleep 0.05; done
# /proc/$$: inside $(...) the shell's fd 1 is the substitution's pipe, not the journal stream.
exec systemd-cat -t falcon-worker sh -c \\
  'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/$$/fd/1) exec "$0" -m falcon_svc.cli serve' "$2"
"""


@contextmanager
def service_under_journald(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """Start journald and the service in a private mount namespace; yield (master, journald's pid)."""
    pid_file = tmp_path / "journald.pid"
    process = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            _NAMESPACE_SCRIPT,
            "sh",
            str(pid_file),
            sys.executable,
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    journald = 0
    try:
        port = int(env["BIND"].rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"exited {process.returncode}: {process.stderr and process.stderr.read()}"
            if not journald and pid_file.exists() and pid_file.read_text().strip():
                journald = int(pid_file.read_text())
            try:
                if journald and call(port, "GET", "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "service not ready under journald in 60 s"
            time.sleep(0.2)
        yield process, journald
    finally:
        stop_process(process)
        if journald:
            with contextlib.suppress(ProcessLookupError):
                os.kill(journald, signal.SIGTERM)


def journalctl(journald: int, *args: str) -> list[dict[str, object]]:
    """Run journalctl inside journald's namespace; return its entries (-o json)."""
    result = subprocess.run(
        ["nsenter", "-t", str(journald), "-m", "journalctl", "-D", "/run/log/journal", "-o", "json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: no entries with some versions
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wait_for_entries(journald: int, *args: str, within: float = 30.0) -> list[dict[str, object]]:
    """Return journalctl's entries for ``args`` once there are any (journald writes asynchronously)."""
    deadline = time.monotonic() + within
    while not (entries := journalctl(journald, *args)):
        if time.monotonic() > deadline:
            seen = [(entry.get("SYSLOG_IDENTIFIER"), entry.get("MESSAGE")) for entry in journalctl(journald)]
            raise AssertionError(f"journalctl {' '.join(args)}: no entries in {within} s; the journal has {seen[-15:]}")
        time.sleep(0.2)
    return entries


def test_the_runbook_journalctl_recipes_find_what_they_ask_for(dummy_model_dir, tmp_path):
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync")
    with service_under_journald(env, tmp_path) as (master, journald):
        status, headers, _ = call(port, "POST", "/infer", {"text": ""})
        assert status == 422
        request_id = headers["X-Request-ID"]
        # The example: gunicorn's "Worker ... was sent SIGKILL!" is an error.
        os.kill(worker_pids(master.pid)[0], signal.SIGKILL)

        (entry,) = wait_for_entries(journald, f"REQUEST_ID={request_id}")
        errors = wait_for_entries(journald, "-p", "err")
        warnings = wait_for_entries(journald, "-p", "warning", "-t", "falcon-svc")
        events = journalctl(journald, "-t", "falcon-svc")

    assert entry["SYSLOG_IDENTIFIER"] == "falcon-access" and entry["PRIORITY"] == "6", entry
    assert (entry["STATUS"], entry["ERROR_CODE"], entry["ROUTE"]) == ("422", "invalid_input", "/infer"), entry
    line = json.loads(str(entry["MESSAGE"]))
    assert (line["code"], line["field"]) == ("invalid_input", "text"), "journalctl -o cat shows the JSON line"

    assert any("SIGKILL" in str(error["MESSAGE"]) for error in errors), [error["MESSAGE"] for error in errors]
    assert all(int(str(error["PRIORITY"])) <= 3 for error in errors)
    assert any("Redis unreachable" in str(warning["MESSAGE"]) for warning in warnings)
    assert events and not any(event.get("SYSLOG_IDENTIFIER") == "falcon-access" for event in events)
    assert all(event.get("_TRANSPORT") == "journal" for event in events), "events came over the native protocol"
