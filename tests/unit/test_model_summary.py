"""``Model.summary()``: the one description of the model that /readyz, /v1/models and `falcon-svc check` share."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from falcon_svc import cli
from falcon_svc.model import Model


def test_summary_names_the_model_its_kind_and_scorer(model: Model):
    assert model.summary() == {
        "name": model.name,
        "version": model.version,
        "kind": model.kind,
        "scorer": model.scorer,
    }
    assert list(model.summary()) == ["name", "version", "kind", "scorer"], "the JSON keys' order"


def from_readyz(client: falcon.testing.TestClient, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    return client.simulate_get("/readyz").json["model"]


def from_models_list(client: falcon.testing.TestClient, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    (entry,) = client.simulate_get("/v1/models").json["models"]
    added = ["serving", "active", "labels", "metadata"]
    assert list(entry)[-4:] == added, f"/v1/models adds the version's roles, labels and metadata after it: {entry}"
    return {key: value for key, value in entry.items() if key not in added}


def from_check_command(client: falcon.testing.TestClient, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    assert cli.main(["check"]) == 0
    # Log lines are JSON objects on their own lines; the summary is the indented document that follows.
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n") :])["model"]


@pytest.mark.parametrize("describe", [from_readyz, from_models_list, from_check_command])
def test_every_caller_shows_the_same_summary(
    describe: Callable[..., dict[str, Any]],
    client: falcon.testing.TestClient,
    model: Model,
    dummy_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    monkeypatch.setenv("MODEL_DIR", str(dummy_model_dir))
    shown = describe(client, capsys)
    assert shown == model.summary()
    assert list(shown) == list(model.summary()), "same keys, same order"
