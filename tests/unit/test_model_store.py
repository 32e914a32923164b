"""The model store and `falcon-svc models`: import, list, activate through the gate, rollback, pins."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from toy_models import labelled_rows, shuffled, write_csv
from toy_models import train_toy as train

from falcon_svc import cli
from falcon_svc.model.store import ModelStore, StoreError


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("artifacts")
    rows = labelled_rows()
    return {
        "good": train(tmp, "good", rows),
        # NOTE: the same data in another order fits another model: a second good version.
        "good2": train(tmp, "good2", list(reversed(rows))),
        "shuffled": train(tmp, "shuffled", shuffled(rows)),
        "gate_set": write_csv(tmp / "gate.csv", [(text, label) for text, label in rows], ("text", "label")),
    }


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    store = tmp_path / "store"
    monkeypatch.setenv("MODEL_STORE", str(store))
    # NOTE: the toy models fail the behavioural suite's real floor; a test of the floor sets it back.
    monkeypatch.setenv("MODEL_BEHAVIOUR_FLOOR_PERCENT", "0")
    monkeypatch.delenv("MODEL_PUBLIC_KEY", raising=False)
    return store


def models(*args: str) -> int:
    return cli.main(["models", "--env-file", "/nonexistent", *args])


def version_of(artifact: Path) -> str:
    return json.loads((artifact / "metadata.json").read_text())["version"]


def test_import_verifies_copies_and_lists(env: Path, artifacts: dict[str, Path], capsys) -> None:
    assert models("import", str(artifacts["good"]), "--activate") == 0, capsys.readouterr().err
    assert models("import", str(artifacts["good2"])) == 0
    store = ModelStore(env)
    good, good2 = version_of(artifacts["good"]), version_of(artifacts["good2"])
    assert sorted(store.versions()) == sorted([good, good2]) and store.active() == good
    assert os.readlink(env / "active") == f"versions/{good}", "a relative pointer survives moving the store"
    assert (env / "versions" / good / "report.json").is_file(), "the report travels with the artifact"
    capsys.readouterr()
    assert models("list") == 0
    out = capsys.readouterr().out
    assert f"* {good}" in out and "active" in out and good2 in out, out
    assert models("import", str(artifacts["good"])) == 0, "importing the same bytes again changes nothing"


def test_a_corrupt_artifact_is_not_imported(env: Path, artifacts: dict[str, Path], tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in artifacts["good"].iterdir():
        (broken / entry.name).write_bytes(entry.read_bytes())
    with (broken / "model.joblib").open("ab") as handle:
        handle.write(b"tampered")
    assert models("import", str(broken)) == 1
    assert "sha256" in capsys.readouterr().err
    assert ModelStore(env).versions() == []


def test_activate_passes_the_gate_and_rollback_goes_back(env: Path, artifacts: dict[str, Path], capsys) -> None:
    good, good2 = version_of(artifacts["good"]), version_of(artifacts["good2"])
    assert models("import", str(artifacts["good"]), "--activate") == 0
    assert models("import", str(artifacts["good2"])) == 0
    capsys.readouterr()
    assert models("activate", good2, "--gate-set", f"mine={artifacts['gate_set']}", "--reason", "retrained") == 0, (
        capsys.readouterr().err
    )
    out = capsys.readouterr().out
    assert "mine" in out and "accuracy" in out and f"active: {good2} (was {good})" in out, out
    store = ModelStore(env)
    assert (store.active(), store.previous()) == (good2, good)
    assert models("rollback", "--reason", "drill") == 0
    assert (store.active(), store.previous()) == (good, good2)
    actions = [(entry["action"], entry.get("to")) for entry in store.history()]
    assert actions[-2:] == [("activate", good2), ("rollback", good)], actions


def test_the_gate_refuses_a_worse_model_and_force_overrides_it(env: Path, artifacts: dict[str, Path], capsys) -> None:
    good, bad = version_of(artifacts["good"]), version_of(artifacts["shuffled"])
    assert models("import", str(artifacts["good"]), "--activate") == 0
    assert models("import", str(artifacts["shuffled"])) == 0
    gate = ["--gate-set", f"mine={artifacts['gate_set']}"]
    capsys.readouterr()
    assert models("activate", bad, *gate) == 1
    captured = capsys.readouterr()
    assert "refusing to activate" in captured.err and "mine: accuracy" in captured.out, captured
    assert ModelStore(env).active() == good, "a refused version is not activated"
    assert models("activate", bad, *gate, "--force") == 1, "--force without a reason"
    assert "--force needs --reason" in capsys.readouterr().err
    assert models("activate", bad, *gate, "--force", "--reason", "test: deliberately worse") == 0
    store = ModelStore(env)
    assert store.active() == bad
    last = store.history()[-1]
    assert last["forced"] is True and last["reason"] == "test: deliberately worse", last


def test_the_behavioural_floor_refuses(env: Path, artifacts: dict[str, Path], monkeypatch, capsys) -> None:
    assert models("import", str(artifacts["good"])) == 0
    monkeypatch.setenv("MODEL_BEHAVIOUR_FLOOR_PERCENT", "100")
    capsys.readouterr()
    assert models("activate", version_of(artifacts["good"])) == 1
    assert "behavioural suite" in capsys.readouterr().out


def test_pins_and_serving_version(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    store = ModelStore(tmp_path)
    good = store.import_artifact(artifacts["good"])
    good2 = store.import_artifact(artifacts["good2"])
    assert store.serving_version(8001) is None
    store.activate(good)
    store.pin(8001, good2, reason="canary")
    assert (store.serving_version(8001), store.serving_version(8002), store.serving_version(None)) == (
        good2,
        good,
        good,
    )
    assert store.pins() == {8001: good2}
    store.unpin(8001)
    assert store.serving_version(8001) == good and store.pins() == {}
    with pytest.raises(StoreError, match="no version"):
        store.pin(8001, "2020.01.01-00000000")
    with pytest.raises(StoreError, match="not a model version name"):
        store.version_dir("../etc")
    with pytest.raises(StoreError, match="no previous version"):
        ModelStore(tmp_path / "empty").rollback()


def test_show_prints_the_report_compared_with_the_active_version(env: Path, artifacts: dict[str, Path], capsys) -> None:
    assert models("import", str(artifacts["good"]), "--activate") == 0
    assert models("import", str(artifacts["good2"])) == 0
    capsys.readouterr()
    assert models("show", version_of(artifacts["good2"])) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert version_of(artifacts["good2"]) in out and version_of(artifacts["good"]) in out, out
    assert models("show", "--json") == 0
    assert json.loads(capsys.readouterr().out)["version"] == version_of(artifacts["good"])


def test_a_private_artifact_is_stored_readable_by_the_service(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    # An artifact written under umask 077 (root's files, 0600): the workers run as another user.
    private = tmp_path / "private"
    private.mkdir()
    for entry in artifacts["good"].iterdir():
        (private / entry.name).write_bytes(entry.read_bytes())
        (private / entry.name).chmod(0o600)
    store = ModelStore(tmp_path / "store")
    stored = store.version_dir(store.import_artifact(private))
    modes = {entry.name: entry.stat().st_mode & 0o777 for entry in stored.iterdir()}
    assert set(modes.values()) == {0o644} and stored.stat().st_mode & 0o777 == 0o755, modes
