"""Telling a stop from a restart: what systemd's job queue says, read through `systemctl list-jobs`.

A stand-in `systemctl` on PATH answers as systemd 252 does (its output was taken from
the e2e host during a restart, a target restart and a stop).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from falcon_svc import unit_jobs

UNIT = "falcon-worker@8001.service"


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in systemctl printing what the test sets, and recording its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    args_file = tmp_path / "args"

    def answer(stdout: str = "", status: int = 0, stderr: str = "") -> Path:
        script.write_text(
            f"#!/bin/sh\necho \"$@\" > {args_file}\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {status}\n"
        )
        script.chmod(0o755)
        return args_file

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return answer


@pytest.mark.parametrize(
    ("jobs", "for_good"),
    [
        (f"2848 {UNIT} stop running\n", True),
        (f"2847 {UNIT} restart running\n", False),
        # A target restart: the instance's own job is a restart, the target's a start.
        (f"2789 falcon-svc.target start waiting\n2847 {UNIT} restart running\n", False),
        (f"3001 {UNIT} try-restart running\n", False),
        # No job for this unit (`systemctl kill`, a signal from elsewhere): a clean exit stays down.
        ("", True),
        ("2850 falcon-worker@8002.service restart running\n", True),
    ],
)
def test_the_job_type_decides(systemctl, jobs: str, for_good: bool) -> None:
    args = systemctl(jobs)

    assert unit_jobs.stopping_for_good(UNIT) is for_good
    assert args.read_text().split() == ["list-jobs", "--no-legend", "--plain", "--no-pager", UNIT]


def test_unknown_when_systemd_cannot_be_asked(systemctl, caplog: pytest.LogCaptureFixture) -> None:
    systemctl(status=1, stderr="Failed to connect to bus: No such file or directory")

    assert unit_jobs.stopping_for_good(UNIT) is None
    assert "Failed to connect to bus" in caplog.text


def test_unknown_without_systemctl_or_a_unit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    assert unit_jobs.pending_job(UNIT) is None
    assert unit_jobs.stopping_for_good(None) is None


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/system-falcon\\x2dworker.slice/falcon-worker@8001.service\n", UNIT),
        ("9:name=systemd:/system.slice/system-falcon\\x2dworker.slice/falcon-worker@8001.service\n0::/\n", UNIT),
        ("0::/user.slice/user-0.slice/session-1.scope\n", None),
        ("0::/\n", None),
    ],
)
def test_own_unit_comes_from_the_cgroup(tmp_path: Path, cgroup: str, unit: str | None) -> None:
    path = tmp_path / "cgroup"
    path.write_text(cgroup)

    assert unit_jobs.own_unit(path) == unit
    assert unit_jobs.own_unit(tmp_path / "missing") is None
