"""Find the system binaries that tests run; a missing one fails in CI and skips elsewhere.

`make test` installs every package named here (TEST_SYSTEM_PACKAGES in the Makefile),
so a missing binary means an install step is missing. Under CI (the ``CI`` environment
variable set, as .ci/run is) or with ``FALCON_REQUIRE_TOOLS=1`` that is a failure: a
machine that lost a package must not pass by skipping. On a developer's machine that
runs pytest by hand it is a skip that names the Debian package to install.

The trained model's checks follow the same rule (``model_required``, ``skip_or_fail``):
under CI or with ``FALCON_REQUIRE_MODEL`` set, a missing model or baseline fails.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest

# Not on a non-root user's PATH on Debian, but where nginx and friends live.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def tools_required() -> bool:
    """Return whether a missing tool fails the test (CI, or FALCON_REQUIRE_TOOLS=1)."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in {"", "0", "false", "no"} or os.environ.get("FALCON_REQUIRE_TOOLS") == "1"


def find_tool(binary: str, extra_dirs: tuple[str, ...] = ()) -> str | None:
    """Return the path of `binary`: in `extra_dirs` first (globs: the highest version), then PATH, then sbin.

    `extra_dirs` name where the package itself puts the binary (PostgreSQL's
    /usr/lib/postgresql/*/bin), so a stray copy or link elsewhere on PATH does not win.
    """
    candidates = [path for pattern in extra_dirs for path in glob.glob(os.path.join(pattern, binary))]
    executables = sorted((path for path in candidates if os.access(path, os.X_OK)), key=_natural)
    if executables:
        return executables[-1]
    return shutil.which(binary) or shutil.which(binary, path=os.pathsep.join(SYSTEM_DIRS))


def _natural(path: str) -> list[int | str]:
    """Sort key that puts /usr/lib/postgresql/15 after /usr/lib/postgresql/9.6."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def require_tool(binary: str, package: str, extra_dirs: tuple[str, ...] = ()) -> str:
    """Return the path of `binary`; when it is missing, fail under CI and skip elsewhere.

    `package` is the Debian package that provides it; `extra_dirs` are directories
    (glob patterns allowed, e.g. ``/usr/lib/postgresql/*/bin``) to search before PATH.
    """
    found = find_tool(binary, extra_dirs)
    if found:
        return found
    message = f"{binary} not found: apt-get install {package} (`make test` installs it)"
    if tools_required():
        pytest.fail(f"{message}; CI/FALCON_REQUIRE_TOOLS make a missing tool a failure", pytrace=False)
    pytest.skip(message)


def require_venv_tool(binary: str, lock: str) -> str:
    """Return a binary a lock installs into the venv (k6, py-spy), else PATH's; fail under CI, else skip."""
    beside_python = Path(sys.executable).parent / binary
    found = str(beside_python) if os.access(beside_python, os.X_OK) else shutil.which(binary)
    if found is None:
        skip_or_fail(f"{binary} not found: `make venv` installs it into .venv from {lock}", required=tools_required())
    return found


def alive(pid: int) -> bool:
    """Tell whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def model_required() -> bool:
    """Return whether the trained model, and what its checks stand on, must be there (CI, or FALCON_REQUIRE_MODEL).

    `make test` trains the model and sets FALCON_REQUIRE_MODEL=1: there a dummy model,
    a missing vaderSentiment (the baseline and the reference for our port of VADER) or
    metrics training did not write are failures, so the model checks cannot pass by skipping.
    """
    ci = os.environ.get("CI", "").strip().lower()
    required = os.environ.get("FALCON_REQUIRE_MODEL", "").strip().lower()
    return ci not in {"", "0", "false", "no"} or required not in {"", "0", "false", "no"}


def skip_or_fail(reason: str, *, required: bool) -> NoReturn:
    """Skip the test for `reason`; when `required`, fail it instead, with the same reason."""
    if required:
        pytest.fail(f"{reason} (required here, so a failure rather than a skip)", pytrace=False)
    pytest.skip(reason)
