"""Artifact writing, verification and refusal of bad artifacts."""

import json
from pathlib import Path

import pytest

from falcon_svc.model import ModelLoadError, load_model
from falcon_svc.model.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    is_valid_artifact,
    read_artifact,
)
from falcon_svc.training import build_dummy_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_dummy_model(tmp_path_factory.mktemp("artifact") / "sentiment")


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    """Return a private copy of the artifact that a test may damage."""
    target = tmp_path / "copy"
    target.mkdir()
    for name in (MODEL_FILE, METADATA_FILE):
        (target / name).write_bytes((artifact / name).read_bytes())
    return target


def test_metadata_describes_the_artifact(artifact):
    metadata = json.loads((artifact / METADATA_FILE).read_text())
    for key in (
        "name",
        "version",
        "sha256",
        "labels",
        "kind",
        "trained_at",
        "sklearn_version",
        "training_data",
        "metrics",
    ):
        assert key in metadata, f"metadata lacks {key}"
    assert metadata["labels"] == ["negative", "neutral", "positive"]
    assert metadata["version"].endswith(metadata["sha256"][:8])
    assert is_valid_artifact(artifact)


def test_round_trip(artifact):
    pipeline, metadata = read_artifact(artifact)
    assert list(pipeline.classes_) == metadata["labels"]


def test_sha_mismatch_is_refused(copy):
    with (copy / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    assert not is_valid_artifact(copy)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(copy)


def test_metadata_with_another_sha_is_refused(copy):
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["sha256"] = "0" * 64
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(copy)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_model_file_is_refused(copy):
    (copy / MODEL_FILE).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(copy)


def test_missing_metadata_is_refused(copy):
    (copy / METADATA_FILE).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(copy)


def test_corrupt_metadata_is_refused(copy):
    (copy / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_model(copy)


def test_unsupported_format_is_refused(copy):
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["format_version"] = 99
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="unsupported"):
        load_model(copy)


def test_error_message_is_one_sentence(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path / "nope")
    assert "\n" not in str(caught.value)
