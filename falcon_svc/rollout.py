"""Make running units take a new model pointer: reload them, and wait until they serve it.

A reload is gunicorn's graceful HUP (``systemctl reload falcon-worker@PORT``, the unit's
ExecReload): new workers start and load the pointer, old ones finish their requests,
the listening socket never closes. So "done" is not the reload's exit status but the
unit answering ``/v1/models`` with the expected version served.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

UNIT_PATTERN = "falcon-worker@*.service"
_UNIT_PORT = re.compile(r"falcon-worker@(\d+)\.service")

Reloader = Callable[[int], None]


class RolloutError(Exception):
    """A unit could not be reloaded, or did not serve the expected version in time."""


def worker_ports() -> list[int]:
    """Return the ports of the active ``falcon-worker@`` units, ascending."""
    listed = subprocess.run(
        ["systemctl", "list-units", "--plain", "--no-legend", "--state=active", UNIT_PATTERN],
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode != 0:
        raise RolloutError(f"cannot list the worker units: {listed.stderr.strip() or listed.returncode}")
    return sorted({int(port) for port in _UNIT_PORT.findall(listed.stdout)})


def systemctl_reload(port: int) -> None:
    """Reload the unit on ``port`` (gunicorn HUP); raise RolloutError if systemctl refuses."""
    result = subprocess.run(
        ["systemctl", "reload", f"falcon-worker@{port}.service"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RolloutError(f"systemctl reload falcon-worker@{port} failed: {result.stderr.strip()}")


def served_version(port: int, *, timeout: float = 2.0) -> str | None:
    """Return the version the unit on ``port`` serves now (None if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=timeout) as response:
            models = json.load(response)["models"]
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None
    for entry in models:
        if entry.get("serving", True):
            return str(entry["version"])
    return None


def wait_serving(
    port: int,
    version: str,
    *,
    within: float = 120.0,
    poll: float = 0.5,
    confirmations: int = 3,
    serving: Callable[[int], str | None] = served_version,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Wait until the unit on ``port`` serves ``version``; raise RolloutError after ``within`` seconds.

    NOTE: during a HUP the old workers answer until the new ones are up, and with
    several workers per unit both may answer for a moment; ``confirmations``
    answers in a row with the new version mean the old workers are gone.
    """
    deadline = clock() + within
    in_a_row = 0
    last: str | None = None
    while True:
        last = serving(port)
        in_a_row = in_a_row + 1 if last == version else 0
        if in_a_row >= confirmations:
            return
        if clock() > deadline:
            raise RolloutError(
                f"falcon-worker@{port} serves {last or 'nothing'}, not {version}, after {within:.0f} s "
                f"(journalctl -u falcon-worker@{port})"
            )
        sleep(poll)


def reload_and_wait(
    ports: Iterable[int],
    version_for: Callable[[int], str],
    *,
    reload: Reloader = systemctl_reload,
    within: float = 120.0,
    report: Callable[[str], None] = print,
) -> None:
    """Reload each unit in turn and wait until it serves ``version_for(port)`` before the next."""
    for port in ports:
        version = version_for(port)
        reload(port)
        wait_serving(port, version, within=within)
        report(f"falcon-worker@{port} serves {version}")
