"""`falcon-svc train --detailed-exit-code`: the exit code says what was done.

The Ansible role (tasks/model.yml) reports "changed" and refuses a dummy by these codes
alone; tests/ops/test_ansible.py checks the role's side with a stand-in command, this file
checks that the real command exits with the codes the role expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falcon_svc.model.artifact import METADATA_FILE
from falcon_svc.training import build_dummy_model, train_cli
from falcon_svc.training.data import DataUnavailableError
from falcon_svc.training.training import KIND as TRAINED_KIND


def pass_off_as_trained(output: Path) -> Path:
    """Build the (fast) dummy and relabel it, so it counts as a trained model."""
    build_dummy_model(output)
    path = output / METADATA_FILE
    metadata = json.loads(path.read_text("utf-8"))
    path.write_text(json.dumps({**metadata, "kind": TRAINED_KIND}), "utf-8")
    return output


def fake_training(outcome: str):
    def train_model(output: Path, **_: object) -> Path:
        if outcome == "no data":
            raise DataUnavailableError("no corpus here")
        if outcome == "crash":
            raise RuntimeError("out of memory")
        return pass_off_as_trained(output)

    return train_model


@pytest.mark.parametrize(
    ("outcome", "detailed", "plain"),
    [("trained", 3, 0), ("no data", 4, 0), ("crash", 1, 1)],
    ids=["trained", "dummy", "failed"],
)
def test_exit_codes(outcome, detailed, plain, tmp_path, monkeypatch):
    monkeypatch.setattr(train_cli, "train_model", fake_training(outcome))

    with_option = train_cli.main(["--detailed-exit-code", "--output-dir", str(tmp_path / "a")])
    without = train_cli.main(["--output-dir", str(tmp_path / "b")])

    assert (with_option, without) == (detailed, plain), f"{outcome}: --detailed-exit-code, then without it"


def test_a_valid_trained_model_kept_exits_0(tmp_path, monkeypatch):
    output = pass_off_as_trained(tmp_path / "sentiment")
    monkeypatch.setattr(train_cli, "train_model", fake_training("crash"))

    assert train_cli.main(["--detailed-exit-code", "--output-dir", str(output)]) == 0, "nothing to do: 0"


def test_a_dummy_is_never_kept(tmp_path, monkeypatch):
    output = build_dummy_model(tmp_path / "sentiment")
    monkeypatch.setattr(train_cli, "train_model", fake_training("trained"))

    assert train_cli.main(["--detailed-exit-code", "--output-dir", str(output)]) == 3, "the dummy was replaced"
