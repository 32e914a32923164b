"""Training's paths come from its caller: the command line or scripts/train_model.py.

`falcon-svc train` runs from an installed package on the host (the Ansible role), where
there is no repository to find tests/data/clean_sentences.csv or models/ in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from falcon_svc.training import train_cli
from falcon_svc.training.data import DataUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[2]
CLEAN_SET = REPO_ROOT / "tests" / "data" / "clean_sentences.csv"


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path | None]]:
    """Record what train_model is asked for; then fall back to the (fast) dummy."""
    calls: list[tuple[Path, Path | None]] = []

    def record(output: Path, *, clean_set: Path | None = None, **_: object) -> None:
        calls.append((output, clean_set))
        raise DataUnavailableError("not training in a unit test")

    monkeypatch.setattr(train_cli, "train_model", record)
    return calls


def test_by_default_nothing_outside_the_working_directory_is_assumed(train_calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    assert train_cli.main([]) == 0

    assert train_calls == [(Path("models/sentiment"), None)], "default: ./models/sentiment and no clean set"
    assert (tmp_path / "models" / "sentiment" / "metadata.json").is_file(), "the artifact lands under the cwd"


def test_the_clean_set_and_output_dir_given_are_the_ones_used(train_calls, tmp_path):
    output = tmp_path / "out"

    assert train_cli.main(["--output-dir", str(output), "--clean-set", str(CLEAN_SET)]) == 0

    assert train_calls == [(output, CLEAN_SET)]


def test_the_callers_defaults_are_used_and_can_be_overridden(train_calls, tmp_path):
    default_output = tmp_path / "default"
    other_output = tmp_path / "other"

    train_cli.main([], default_output_dir=default_output, default_clean_set=CLEAN_SET)
    train_cli.main(["--output-dir", str(other_output)], default_output_dir=default_output, default_clean_set=CLEAN_SET)

    assert train_calls == [(default_output, CLEAN_SET), (other_output, CLEAN_SET)]


def test_a_clean_set_that_is_not_a_file_is_refused_before_training(train_calls, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--output-dir", str(tmp_path), "--clean-set", str(tmp_path / "missing.csv")])

    assert exit_info.value.code == 2, "argparse's usage error"
    assert "missing.csv is not a file" in capsys.readouterr().err
    assert train_calls == [], "nothing was trained"


def test_the_script_passes_the_checkouts_clean_set_and_models_dir():
    # COLUMNS: argparse must not wrap a path across lines.
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train_model.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "1000"},
    )

    assert result.returncode == 0, result.stderr
    assert f"(default: {CLEAN_SET})" in result.stdout, result.stdout
    assert f"(default: {REPO_ROOT / 'models' / 'sentiment'})" in result.stdout, result.stdout
