"""`make run` and `make model` take BIND and MODEL_DIR from the command line, the environment, .env, defaults.

The real Makefile runs in a scratch copy of the repo's top level whose .venv holds
stand-ins for python and falcon-svc that print what they were given, so the test sees
what `make run` would have trained into and served with, without training or serving.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
# The prerequisites of the Makefile's .venv stamp: present, and older than the stamp.
STAMP_INPUTS = ("requirements.txt", "requirements-dev.txt", "requirements-nodeps.txt", "setup.cfg", "pyproject.toml")
STAND_IN = """#!/bin/sh
echo "{name} $* | BIND=$BIND MODEL_DIR=$MODEL_DIR WORKERS=${{WORKERS-unset}}"
"""
SETTINGS = ("BIND", "MODEL_DIR", "WORKERS", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A directory holding the Makefile and a .venv of stand-ins that is up to date."""
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    for name in STAMP_INPUTS:
        (tmp_path / name).touch()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "falcon-svc"):
        (bin_dir / name).write_text(STAND_IN.format(name=name))
        (bin_dir / name).chmod(0o755)
    stamp = tmp_path / ".venv" / ".installed"
    stamp.touch()
    later = time.time() + 60
    os.utime(stamp, (later, later))
    return tmp_path


def make_run(checkout: Path, **environment: str) -> list[str]:
    """Run `make run` in the checkout with only `environment` set of the settings; return its lines."""
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    result = subprocess.run(
        [require_tool("make", "make"), "--no-print-directory", "run"],
        cwd=checkout,
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def line(lines: list[str], start: str) -> str:
    found = [text for text in lines if text.startswith(start)]
    assert len(found) == 1, f"want one line starting {start!r} in:\n" + "\n".join(lines)
    return found[0]


def test_defaults_without_dotenv(checkout):
    lines = make_run(checkout)
    assert "--output-dir models/sentiment" in line(lines, "python scripts/train_model.py")
    assert line(lines, "falcon-svc on ").startswith("falcon-svc on http://127.0.0.1:8000 ")
    assert "BIND=127.0.0.1:8000 MODEL_DIR=models/sentiment" in line(lines, "falcon-svc serve")


def test_dotenv_sets_the_printed_url_the_bind_and_the_model_dir(checkout):
    (checkout / ".env").write_text('BIND=127.0.0.1:18765\nMODEL_DIR="/srv/models/x"\nWORKERS=3\n')
    lines = make_run(checkout)
    assert "--output-dir /srv/models/x" in line(lines, "python scripts/train_model.py"), "model trains into .env's"
    assert line(lines, "falcon-svc on ").startswith("falcon-svc on http://127.0.0.1:18765 ")
    assert "curl -s http://127.0.0.1:18765/infer" in line(lines, "  curl")
    served = line(lines, "falcon-svc serve")
    assert "BIND=127.0.0.1:18765 MODEL_DIR=/srv/models/x WORKERS=3" in served


def test_the_environment_beats_dotenv(checkout):
    (checkout / ".env").write_text("BIND=127.0.0.1:18765\nMODEL_DIR=/srv/models/x\nWORKERS=3\n")
    lines = make_run(checkout, BIND="127.0.0.1:18766", WORKERS="5")
    assert line(lines, "falcon-svc on ").startswith("falcon-svc on http://127.0.0.1:18766 ")
    served = line(lines, "falcon-svc serve")
    assert "BIND=127.0.0.1:18766 MODEL_DIR=/srv/models/x WORKERS=5" in served, "env wins; .env fills the rest"


def test_migrate_runs_before_serve_with_the_same_settings(checkout):
    (checkout / ".env").write_text("BIND=127.0.0.1:18765\n")
    lines = make_run(checkout)
    migrate = [i for i, text in enumerate(lines) if text.startswith("falcon-svc migrate --if-reachable")]
    serve = [i for i, text in enumerate(lines) if text.startswith("falcon-svc serve")]
    assert migrate and serve and migrate[0] < serve[0], "\n".join(lines)
    assert "BIND=127.0.0.1:18765" in lines[migrate[0]]


def test_a_unix_socket_bind_prints_a_unix_socket_curl(checkout):
    (checkout / ".env").write_text("BIND=unix:/run/falcon.sock\n")
    lines = make_run(checkout)
    assert "curl -s --unix-socket /run/falcon.sock http://localhost/infer" in line(lines, "  curl")
