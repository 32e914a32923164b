"""Ask systemd what it is doing to this service's unit: a restart, or a stop for good.

The master keeps its listening socket in systemd's fd store so a restart never
refuses a connection (``falcon_svc/systemd.py``). On a stop for good that same
socket would keep taking connections nobody is left to answer until the drain
ends; the master takes it out of the store then, and the port closes as soon as
the workers let go of it. Only systemd knows which of the two a SIGTERM means:
its job queue says ``restart`` (also for the target's restart, propagated by
``PartOf=``) or ``stop``.

``systemctl list-jobs`` asks over D-Bus, which needs no privilege; ``systemctl``
is used rather than a D-Bus library so that nothing is added to the service's
dependencies for one call per stop.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

SYSTEMCTL = "systemctl"
# systemctl answers in milliseconds; this bounds a stop's wait when D-Bus is wedged.
QUERY_TIMEOUT_SECONDS = 2.0
# Jobs after which the unit runs again: its socket must stay open meanwhile.
RESTARTING_JOBS = frozenset({"restart", "try-restart", "reload-or-restart", "reload-or-try-restart", "start"})
_SERVICE = re.compile(r"[^/]+\.service$")


def own_unit(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """Return the name of the service unit whose cgroup this process is in, or None outside one."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # cgroup v2 ("0::/path") first; v1's named systemd hierarchy says the same.
        path = line.split(":", 2)[-1]
        match = _SERVICE.search(path)
        if match:
            return match.group(0)
    return None


def pending_job(unit: str) -> str | None:
    """Return the type of the job systemd is running on ``unit`` ("stop", "restart"...), "" when none.

    None when systemd could not be asked (no systemctl, no D-Bus, a timeout).
    """
    try:
        done = subprocess.run(
            [SYSTEMCTL, "list-jobs", "--no-legend", "--plain", "--no-pager", unit],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as ex:
        logger.warning("cannot ask systemd for %s's job: %s", unit, ex)
        return None
    if done.returncode != 0:
        logger.warning("cannot ask systemd for %s's job: %s", unit, done.stderr.strip() or f"exit {done.returncode}")
        return None
    for line in done.stdout.splitlines():
        fields = line.split()
        # "2847 falcon-worker@8001.service restart running"
        if len(fields) >= 4 and fields[1] == unit:
            return fields[2]
    return ""


def stopping_for_good(unit: str | None) -> bool | None:
    """Return True when systemd stops ``unit`` with no start to follow, False on a restart, None if unknown.

    No job at all (``systemctl kill``, a signal from elsewhere) is a stop for good:
    after a clean exit ``Restart=on-failure`` does not start the unit again.
    """
    if unit is None:
        return None
    job = pending_job(unit)
    if job is None:
        return None
    return job not in RESTARTING_JOBS
