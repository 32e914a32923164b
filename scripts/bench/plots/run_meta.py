"""Write meta.json of a results directory: the machine, the date and the run's settings.

    run_meta.py OUT.json [NAME=VALUE ...]

Every results directory the plots read (sweep_load.sh, sweep_workers.sh and
bench_peers.sh with RESULTS_DIR) holds one, so each plot can say where and when its
numbers were measured: a rate means little without the cores that produced it. The
machine is the one this runs on, the load generator's; against a URL on another host
that host's cores are a setting to pass (e.g. ``target=e2e-host``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Return the CPU's model name from /proc/cpuinfo, or the architecture when it has none."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.machine()


def machine() -> dict[str, Any]:
    """Return the cores this process may run on (as nproc counts them), the CPU model and the host name."""
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu_model(), "hostname": platform.node()}


def meta(settings: dict[str, str], now: datetime | None = None) -> dict[str, Any]:
    """Return the meta.json document: the UTC date, the machine and `settings`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return {"date": moment.strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(), "settings": settings}


def parse_settings(pairs: Sequence[str]) -> dict[str, str]:
    """Return NAME=VALUE arguments as a dict; raise ValueError on one without '='."""
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"expected NAME=VALUE, got {pair!r}")
        settings[name] = value
    return settings


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: run_meta.py OUT.json [NAME=VALUE ...]", file=sys.stderr)
        return 2
    try:
        settings = parse_settings(argv[1:])
    except ValueError as ex:
        print(f"run_meta: {ex}", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(json.dumps(meta(settings), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
