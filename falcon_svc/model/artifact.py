"""Write and read the versioned model artifact: ``model.joblib`` + ``metadata.json``.

The metadata records the joblib file's sha256; loading refuses a file whose hash
differs, so a half-copied or swapped model never serves traffic. That is integrity,
not authentication: whoever can write the model can rewrite its metadata too. With
trusted public keys (MODEL_PUBLIC_KEY) loading also requires ``signature.json``, an
Ed25519 signature over both files' bytes (falcon_svc/model/signing.py), checked on
the very bytes that are then parsed and unpickled.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import sklearn
from sklearn.pipeline import Pipeline

if TYPE_CHECKING:
    from falcon_svc.model.signing import PublicKey

MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
SIGNATURE_FILE = "signature.json"
# NOTE: what read_artifact records in the loaded metadata's "signature" key when no
# key is configured; startup.py turns it into its one warning line.
UNAUTHENTICATED = "not verified (MODEL_PUBLIC_KEY is unset)"
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
    leaves the previous artifact intact rather than a torn one. An older signature
    is removed first: it signs other bytes, and "not signed" is the clearer refusal
    (sign the new artifact with ``falcon-svc model sign`` or ``train --signing-key``).
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / SIGNATURE_FILE).unlink(missing_ok=True)
    model_path = output / MODEL_FILE
    atomic_write(model_path, lambda path: joblib.dump(pipeline, path))
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
    atomic_write(output / METADATA_FILE, lambda path: Path(path).write_text(text, "utf-8"))
    return output


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``target`` (same directory).

    The file gets the umask's usual mode, not mkstemp's 0600: a model trained by root
    (the Ansible role) must stay readable by the service user.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """Return the process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_metadata(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed metadata of an artifact; raise ModelLoadError if unusable."""
    return _parse_metadata(Path(model_dir) / METADATA_FILE, _read_metadata_bytes(model_dir))


def _read_metadata_bytes(model_dir: str | os.PathLike[str]) -> bytes:
    return _read_files(model_dir, (METADATA_FILE,))[0] or b""


def read_artifact_bytes(model_dir: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """Return the exact bytes of (metadata.json, model.joblib); raise ModelLoadError."""
    metadata_bytes, model_bytes, _ = read_artifact_files(model_dir)
    return metadata_bytes, model_bytes


def read_artifact_files(model_dir: str | os.PathLike[str]) -> tuple[bytes, bytes, bytes | None]:
    """Return the bytes of (metadata.json, model.joblib, signature.json or None), all from one directory.

    NOTE: the directory is opened once and each file read through that handle, so a
    swap (publish_artifact renames a new artifact over this directory) between two reads
    cannot mix an old file with a new one: a reader gets the old artifact or the new one.
    """
    metadata_bytes, model_bytes, signature_bytes = _read_files(
        model_dir, (METADATA_FILE, MODEL_FILE, SIGNATURE_FILE), optional={SIGNATURE_FILE}
    )
    return metadata_bytes or b"", model_bytes or b"", signature_bytes


def _read_files(
    model_dir: str | os.PathLike[str], names: Sequence[str], optional: frozenset[str] | set[str] = frozenset()
) -> list[bytes | None]:
    try:
        directory = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as ex:
        raise ModelLoadError(f"model directory {model_dir} does not exist") from ex
    contents: list[bytes | None] = []
    try:
        for name in names:
            path = Path(model_dir) / name
            try:
                handle = os.open(name, os.O_RDONLY, dir_fd=directory)
            except FileNotFoundError as ex:
                if name in optional:
                    contents.append(None)
                    continue
                what = "metadata" if name == METADATA_FILE else "file"
                raise ModelLoadError(f"model {what} {path} is missing") from ex
            except OSError as ex:
                raise ModelLoadError(f"model file {path} is unreadable: {ex.strerror or ex}") from ex
            with os.fdopen(handle, "rb") as stream:
                contents.append(stream.read())
    finally:
        os.close(directory)
    return contents


def _parse_metadata(path: Path, data: bytes) -> dict[str, Any]:
    try:
        metadata = json.loads(data.decode("utf-8"))
    except ValueError as ex:
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


def read_artifact(
    model_dir: str | os.PathLike[str],
    *,
    public_keys: Sequence[PublicKey] = (),
) -> tuple[Pipeline, dict[str, Any]]:
    """Load and verify an artifact; return (pipeline, metadata).

    The signature (when ``public_keys`` are given) and the sha256 are checked before
    unpickling: joblib files run code on load, so an unexpected file must not get that
    far. Each file is read once, through one handle on the directory, and what is
    verified is what is parsed and unpickled, so nothing can swap a file in between.
    The returned metadata's ``signature`` says which key verified it, or UNAUTHENTICATED.
    """
    metadata_bytes, model_bytes, signature_bytes = read_artifact_files(model_dir)
    model_path = Path(model_dir) / MODEL_FILE
    signature = UNAUTHENTICATED
    if public_keys:
        from falcon_svc.model.signing import verify_signature

        signer = verify_signature(model_dir, metadata_bytes, model_bytes, public_keys, signature_bytes=signature_bytes)
        signature = f"verified with key {signer.key_id}"
    metadata = _parse_metadata(Path(model_dir) / METADATA_FILE, metadata_bytes)
    actual = hashlib.sha256(model_bytes).hexdigest()
    if actual != metadata["sha256"]:
        raise ModelLoadError(
            f"model file {model_path} has sha256 {actual[:12]}..., but the metadata "
            f"expects {str(metadata['sha256'])[:12]}...; refusing a corrupt or mismatched artifact"
        )
    try:
        pipeline = joblib.load(io.BytesIO(model_bytes))
    except Exception as ex:  # NOTE: unpickling can raise almost anything
        raise ModelLoadError(f"model file {model_path} cannot be unpickled: {ex}") from ex
    if not isinstance(pipeline, Pipeline) or not hasattr(pipeline, "predict_proba"):
        raise ModelLoadError(f"model file {model_path} does not hold a scikit-learn Pipeline")
    labels = [str(label) for label in getattr(pipeline, "classes_", [])]
    if labels != list(metadata["labels"]):
        raise ModelLoadError(f"model file {model_path} predicts {labels}, but the metadata says {metadata['labels']}")
    return pipeline, {**metadata, "signature": signature}


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


# --- Publishing: stage, sign, swap ------------------------------------------------------
# NOTE: a worker (re)started while a model is being replaced must see the old, complete,
# signed artifact or the new one, never a half-written or not-yet-signed one (it would
# exit 66 and gunicorn would respawn it in a loop). So a new artifact is written and
# signed in a staging directory beside the model directory, then the two directories are
# exchanged in one renameat2(RENAME_EXCHANGE); the old one is kept as PREVIOUS_SUFFIX
# until the next publish, so a reader that opened it just before the swap can finish.
STAGING_PREFIX = ".staging-"
PREVIOUS_SUFFIX = ".previous"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_directory(model_dir: str | os.PathLike[str]) -> Path:
    """Create an empty staging directory beside ``model_dir`` (same filesystem, same owner)."""
    target = Path(model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{STAGING_PREFIX}"))


def previous_directory(model_dir: str | os.PathLike[str]) -> Path:
    """Return where the artifact replaced by the last publish is kept (a manual rollback)."""
    target = Path(model_dir)
    return target.parent / f"{target.name}{PREVIOUS_SUFFIX}"


def publish_artifact(staged: str | os.PathLike[str], model_dir: str | os.PathLike[str]) -> Path:
    """Swap the complete artifact in ``staged`` into ``model_dir`` atomically; return ``model_dir``.

    ``staged`` must be a sibling of ``model_dir`` (a rename cannot cross filesystems); it
    is left empty of meaning afterwards (the old artifact is moved to previous_directory).
    Sign ``staged`` first: what is swapped in is what workers load.
    """
    staged, target = Path(staged), Path(model_dir)
    if staged.resolve().parent != target.resolve().parent:
        raise ValueError(f"cannot publish {staged} into {target}: not in the same directory")
    read_artifact_bytes(staged)  # NOTE: refuse an incomplete artifact before anyone can see it
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from the service
    previous = previous_directory(target)
    if previous.exists():
        shutil.rmtree(previous)
    if not target.exists():
        os.rename(staged, target)
        return target
    try:
        _exchange(staged, target)
    except OSError as ex:
        if ex.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        # NOTE: a filesystem without RENAME_EXCHANGE: two renames, with a window of
        # microseconds (not minutes) in which MODEL_DIR does not exist.
        os.rename(target, previous)
        os.rename(staged, target)
        return target
    os.rename(staged, previous)
    return target


def _exchange(first: Path, second: Path) -> None:
    """Exchange two paths atomically (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot exchange {first} and {second}: {os.strerror(code)}")
