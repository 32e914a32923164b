"""Sign and verify model artifacts with Ed25519: who built the model, not only which bytes.

The sha256 in ``metadata.json`` only says the model file matches its metadata; whoever
can write one can rewrite both. A detached ``signature.json`` next to them signs the
sha256 of the metadata file's bytes AND of the model file's bytes, so neither can be
swapped, and only the holder of the private key can make one. The service holds the
public key(s) (``MODEL_PUBLIC_KEY``) and verifies before anything is unpickled
(``artifact.read_artifact``); the private key stays with whoever builds the model
(``falcon-svc model keygen``/``sign`` in falcon_svc/model_commands.py, ``falcon-svc
train --signing-key``).

Failure semantics: a missing, malformed or non-verifying signature raises
``SignatureError`` (a ``ModelLoadError``: start-up exits 66); a public key file that is
missing or not an Ed25519 key raises ``PublicKeyError`` (a configuration error: exit 78).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from falcon_svc.model.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    ModelLoadError,
    atomic_write,
    read_artifact_bytes,
    read_artifact_files,
)
from falcon_svc.model_commands import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE

ALGORITHM = "ed25519"
# NOTE: a fixed prefix, so a signature made for anything else with the same key (another
# tool, another format version) can never pass as a model signature.
_DOMAIN = b"falcon-svc model artifact v1\n"


class SignatureError(ModelLoadError):
    """The artifact's signature is missing, malformed, or made by no trusted key."""


class SigningRefusedError(ValueError):
    """The artifact to sign lies where someone other than the signer could have written it."""


class _Unread:
    """The type of _UNREAD: verify_signature reads signature.json itself."""


_UNREAD = _Unread()


class PublicKeyError(ValueError):
    """A configured public key (MODEL_PUBLIC_KEY) is unreadable or not Ed25519."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A trusted Ed25519 public key, its file and its key id (fingerprint)."""

    key: Ed25519PublicKey
    key_id: str
    path: Path


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the key's fingerprint: ``ed25519:`` + 16 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{ALGORITHM}:{hashlib.sha256(raw).hexdigest()[:16]}"


def signed_message(metadata_bytes: bytes, model_bytes: bytes) -> bytes:
    """Return what is signed: the domain prefix and the sha256 of both files' exact bytes."""
    metadata_sha256 = hashlib.sha256(metadata_bytes).hexdigest()
    model_sha256 = hashlib.sha256(model_bytes).hexdigest()
    return _DOMAIN + f"{METADATA_FILE} {metadata_sha256}\n{MODEL_FILE} {model_sha256}\n".encode()


# --- Keys ------------------------------------------------------------------------
def load_public_key(path: Path) -> PublicKey:
    """Read an Ed25519 public key: PEM (SubjectPublicKeyInfo) or the raw 32 bytes."""
    try:
        data = path.read_bytes()
    except OSError as ex:
        raise PublicKeyError(f"model public key {path} is unreadable: {ex.strerror or ex}") from ex
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        elif len(data) == 32:
            key = Ed25519PublicKey.from_public_bytes(data)
        else:
            raise ValueError("neither PEM nor 32 raw bytes")
    except ValueError as ex:
        raise PublicKeyError(f"model public key {path} is not an Ed25519 public key ({ex})") from ex
    if not isinstance(key, Ed25519PublicKey):
        raise PublicKeyError(f"model public key {path} is a {type(key).__name__}, not an Ed25519 key")
    return PublicKey(key, key_id(key), path)


def load_public_keys(spec: str) -> tuple[PublicKey, ...]:
    """Read MODEL_PUBLIC_KEY: comma-separated key files, any of which may sign (rotation)."""
    return tuple(load_public_key(Path(part.strip())) for part in spec.split(",") if part.strip())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PEM (PKCS#8) Ed25519 private key; raise ValueError with the path."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as ex:
        raise ValueError(f"signing key {path} is unreadable or not an unencrypted PEM key: {ex}") from ex
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair into ``directory``: the private key 0600, the public key 0644.

    Refuses to overwrite: replacing a key silently would orphan every signature made
    with it and every host trusting it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; move it away to generate a new key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # NOTE: created 0600 by os.open, never written with a wider mode first.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_path.write_bytes(public_pem)
    public_path.chmod(0o644)
    return private_path, public_path


# --- Sign and verify ---------------------------------------------------------------
def check_only_signer_can_write(model_dir: str | os.PathLike[str]) -> None:
    """Raise SigningRefusedError unless only root or the signer can change the artifact.

    A signature vouches for whatever bytes are there: if another user (the service
    user, say, owning a parent directory it can rename) could have put them there,
    signing would launder that user's model. So, like ssh's StrictModes, every
    directory from / down and both files must be owned by root or by us and not be
    writable by group or others (a sticky world-writable directory such as /tmp is
    allowed: nobody else may rename what is ours in it).
    """
    allowed = {0, os.geteuid()}
    directory = Path(model_dir).resolve()
    paths = [*reversed(directory.parents), directory, directory / METADATA_FILE, directory / MODEL_FILE]
    for path in paths:
        try:
            status = path.stat()
        except OSError as ex:
            raise SigningRefusedError(f"cannot check who may write {path}: {ex.strerror or ex}") from ex
        writable_by_others = status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky_directory = stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX
        if status.st_uid not in allowed or (writable_by_others and not sticky_directory):
            raise SigningRefusedError(
                f"refusing to sign {directory}: {path} is owned by uid {status.st_uid} with mode "
                f"{stat.S_IMODE(status.st_mode):04o}, so someone other than root or the signer could "
                "have replaced the model; keep the artifact in a directory only root (or you) can write"
            )


def sign_artifact(model_dir: str | os.PathLike[str], private_key: Ed25519PrivateKey) -> str:
    """Write ``signature.json`` for the artifact in ``model_dir``; return the key id.

    Raises SigningRefusedError when someone else could have written the artifact.
    """
    check_only_signer_can_write(model_dir)
    metadata_bytes, model_bytes = read_artifact_bytes(model_dir)
    signature = private_key.sign(signed_message(metadata_bytes, model_bytes))
    signer = key_id(private_key.public_key())
    document = {
        "algorithm": ALGORITHM,
        "key_id": signer,
        # Informational (a reader sees what was signed); verify recomputes both.
        "metadata_sha256": hashlib.sha256(metadata_bytes).hexdigest(),
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(model_dir) / SIGNATURE_FILE, lambda path: Path(path).write_text(text, "utf-8"))
    return signer


def sign_unless_signed(model_dir: str | os.PathLike[str], private_key: Ed25519PrivateKey) -> tuple[str, bool]:
    """Sign unless this key's signature already covers the artifact; return (key id, signed now).

    NOTE: idempotent, so Ansible reports a change only when a signature was written,
    and an artifact kept across an upgrade is signed once.
    """
    public_key = private_key.public_key()
    public = PublicKey(public_key, key_id(public_key), Path(model_dir))
    metadata_bytes, model_bytes, signature_bytes = read_artifact_files(model_dir)
    try:
        verify_signature(model_dir, metadata_bytes, model_bytes, [public], signature_bytes=signature_bytes)
    except SignatureError:
        return sign_artifact(model_dir, private_key), True
    return public.key_id, False


def verify_signature(
    model_dir: str | os.PathLike[str],
    metadata_bytes: bytes,
    model_bytes: bytes,
    trusted: Sequence[PublicKey],
    *,
    signature_bytes: bytes | _Unread | None = _UNREAD,
) -> PublicKey:
    """Return the trusted key whose signature covers these exact bytes; raise SignatureError.

    The caller passes the bytes it will parse and unpickle, read once, so nothing can
    swap a file between this check and the load; and, when it read them through one
    handle on the directory (artifact.read_artifact_files), the signature's bytes too
    (None: there was none), so a swapped-in artifact cannot pair with the old signature.
    """
    path = Path(model_dir) / SIGNATURE_FILE
    trusted_ids = ", ".join(key.key_id for key in trusted)
    try:
        if isinstance(signature_bytes, _Unread):
            signature_bytes = path.read_bytes()
        if signature_bytes is None:
            raise FileNotFoundError(path)
        document = json.loads(signature_bytes.decode("utf-8"))
    except FileNotFoundError as ex:
        raise SignatureError(
            f"model artifact {model_dir} is not signed ({path} is missing) and MODEL_PUBLIC_KEY "
            f"requires a signature by {trusted_ids}; sign it with: falcon-svc model sign {model_dir} --key KEY"
        ) from ex
    except (OSError, ValueError) as ex:
        raise SignatureError(f"model signature {path} is unreadable: {ex}") from ex
    try:
        if document["algorithm"] != ALGORITHM:
            raise SignatureError(f"model signature {path} uses {document['algorithm']!r}, not {ALGORITHM}")
        signature = base64.b64decode(document["signature"], validate=True)
        claimed = str(document.get("key_id", "?"))
    except (KeyError, TypeError, ValueError) as ex:
        raise SignatureError(f"model signature {path} is malformed: {ex!r}") from ex
    message = signed_message(metadata_bytes, model_bytes)
    for key in trusted:
        try:
            key.key.verify(signature, message)
        except InvalidSignature:
            continue
        return key
    known = claimed in {key.key_id for key in trusted}
    reason = (
        "the model or its metadata changed after signing"
        if known
        else f"it claims key {claimed}, which MODEL_PUBLIC_KEY does not trust"
    )
    raise SignatureError(
        f"model signature {path} does not verify with the trusted key(s) {trusted_ids}: {reason}; "
        "refusing to load the artifact"
    )
