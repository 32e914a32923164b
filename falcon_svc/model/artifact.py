"""Write and read the versioned model artifact: ``model.joblib`` + ``metadata.json``.

The metadata records the joblib file's sha256; loading refuses a file whose hash
differs, so a half-copied or swapped model never serves traffic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import sklearn
from sklearn.pipeline import Pipeline

MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
# Bump whenever the fitted pipeline's shape changes, or a class or function it
# pickles by import path moves (features.LexiconFeatures, features.preprocess), so
# old artifacts are retrained rather than loaded into code that no longer matches them.
FORMAT_VERSION = 2
REQUIRED_KEYS = ("name", "version", "sha256", "labels", "kind", "format_version")


class ModelLoadError(Exception):
    """Raised when a model artifact is missing, corrupt or unsupported."""


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(pipeline: Pipeline, metadata: dict[str, Any], output_dir: str | os.PathLike[str]) -> Path:
    """Save ``pipeline`` and its metadata into ``output_dir``; return the directory.

    Fill in sha256, version, trained_at and library versions here, so no caller can
    forget them. Files are written to temporary names and renamed, so a crash
    leaves the previous artifact intact rather than a torn one.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model_path = output / MODEL_FILE
    _atomic_write(model_path, lambda path: joblib.dump(pipeline, path))
    sha256 = sha256_file(model_path)
    trained_at = datetime.now(UTC).replace(microsecond=0)
    full = {
        "name": "sentiment",
        **metadata,
        "format_version": FORMAT_VERSION,
        "version": f"{trained_at:%Y.%m.%d}-{sha256[:8]}",
        "sha256": sha256,
        "trained_at": trained_at.isoformat(),
        "sklearn_version": sklearn.__version__,
        "labels": [str(label) for label in pipeline.classes_],
    }
    text = json.dumps(full, indent=2, sort_keys=True) + "\n"
    _atomic_write(output / METADATA_FILE, lambda path: Path(path).write_text(text, "utf-8"))
    return output


def _atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``target`` (same directory)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed metadata of an artifact; raise ModelLoadError if unusable."""
    path = Path(model_dir) / METADATA_FILE
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    try:
        metadata = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as ex:
        raise ModelLoadError(f"model metadata {path} is missing") from ex
    except (OSError, ValueError) as ex:
        raise ModelLoadError(f"model metadata {path} is unreadable: {ex}") from ex
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"model metadata {path} is not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ModelLoadError(f"model metadata {path} lacks {', '.join(missing)}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise ModelLoadError(
            f"model artifact format {metadata['format_version']!r} is unsupported (expected {FORMAT_VERSION})"
        )
    return metadata


def read_artifact(model_dir: str | os.PathLike[str]) -> tuple[Pipeline, dict[str, Any]]:
    """Load and verify an artifact; return (pipeline, metadata).

    The sha256 is checked before unpickling: joblib files run code on load, so an
    unexpected file must not get that far.
    """
    metadata = read_metadata(model_dir)
    model_path = Path(model_dir) / MODEL_FILE
    if not model_path.is_file():
        raise ModelLoadError(f"model file {model_path} is missing")
    actual = sha256_file(model_path)
    if actual != metadata["sha256"]:
        raise ModelLoadError(
            f"model file {model_path} has sha256 {actual[:12]}..., but the metadata "
            f"expects {str(metadata['sha256'])[:12]}...; refusing a corrupt or mismatched artifact"
        )
    try:
        pipeline = joblib.load(model_path)
    except Exception as ex:  # NOTE: unpickling can raise almost anything
        raise ModelLoadError(f"model file {model_path} cannot be unpickled: {ex}") from ex
    if not isinstance(pipeline, Pipeline) or not hasattr(pipeline, "predict_proba"):
        raise ModelLoadError(f"model file {model_path} does not hold a scikit-learn Pipeline")
    labels = [str(label) for label in getattr(pipeline, "classes_", [])]
    if labels != list(metadata["labels"]):
        raise ModelLoadError(f"model file {model_path} predicts {labels}, but the metadata says {metadata['labels']}")
    return pipeline, metadata


def is_valid_artifact(model_dir: str | os.PathLike[str]) -> bool:
    """Return True if ``model_dir`` holds an artifact that verifies (without unpickling)."""
    try:
        metadata = read_metadata(model_dir)
        model_path = Path(model_dir) / MODEL_FILE
        return (
            metadata.get("format_version") == FORMAT_VERSION
            and model_path.is_file()
            and sha256_file(model_path) == metadata["sha256"]
        )
    except ModelLoadError:
        return False
