"""`falcon-svc train`: what it keeps and what it rebuilds."""

from pathlib import Path

import pytest

from falcon_svc.training import build_dummy_model, train_cli
from falcon_svc.training.data import DataUnavailableError


def test_an_existing_dummy_model_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A dummy left by an earlier run without the corpus: training is tried again, and
    # if the corpus is still missing the DUMMY warning is printed again (for a person;
    # the Ansible role judges by --detailed-exit-code, and workers refuse a dummy unless
    # ALLOW_DUMMY_MODEL).
    output = build_dummy_model(tmp_path / "sentiment")
    attempts: list[Path] = []

    def corpus_missing(path: Path, **_: object) -> None:
        attempts.append(path)
        raise DataUnavailableError("no corpus here")

    monkeypatch.setattr(train_cli, "train_model", corpus_missing)

    assert train_cli.main(["--output-dir", str(output)]) == 0

    assert attempts == [output]
    assert "DUMMY" in capsys.readouterr().err
