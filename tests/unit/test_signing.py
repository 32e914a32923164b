"""Model artifact signatures: who may build the model the service unpickles (finding 13).

Each attack rewrites what an attacker with write access to the model directory could:
the metadata, the model file (with a metadata that matches it), the signature. A
signature covers both files' bytes, and verification happens before joblib.load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import joblib
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from falcon_svc.model import ModelLoadError, load_model
from falcon_svc.model import artifact as artifact_module
from falcon_svc.model.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    UNAUTHENTICATED,
    previous_directory,
    publish_artifact,
    read_artifact,
    staging_directory,
    write_artifact,
)
from falcon_svc.model.signing import (
    PublicKeyError,
    SignatureError,
    SigningRefusedError,
    generate_keypair,
    load_private_key,
    load_public_key,
    load_public_keys,
    sign_artifact,
    sign_unless_signed,
)
from falcon_svc.model_commands import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE
from falcon_svc.settings import Settings
from falcon_svc.startup import EXIT_CONFIG, EXIT_NO_MODEL, load_model_or_exit
from falcon_svc.training import build_dummy_model, train_cli
from falcon_svc.training.data import DataUnavailableError


class WritesAFileWhenUnpickled:
    """A pickle payload: loading it creates ``marker`` (as a malicious model would run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return generate_keypair(tmp_path_factory.mktemp("keys"))[0].parent


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys) -> Path:
    artifact = build_dummy_model(tmp_path_factory.mktemp("signed") / "sentiment")
    sign_artifact(artifact, load_private_key(keys / PRIVATE_KEY_FILE))
    return artifact


@pytest.fixture
def copy(signed, tmp_path) -> Path:
    """A private copy of the signed artifact that a test may damage."""
    return Path(shutil.copytree(signed, tmp_path / "copy"))


@pytest.fixture
def trusted(keys):
    return load_public_keys(str(keys / PUBLIC_KEY_FILE))


def rewrite_metadata(artifact: Path, **changes: object) -> None:
    metadata = json.loads((artifact / METADATA_FILE).read_text())
    (artifact / METADATA_FILE).write_text(json.dumps({**metadata, **changes}, indent=2))


def test_signed_artifact_round_trip_names_the_key(signed, trusted):
    pipeline, metadata = read_artifact(signed, public_keys=trusted)
    assert list(pipeline.classes_) == metadata["labels"]
    assert metadata["signature"] == f"verified with key {trusted[0].key_id}"
    assert trusted[0].key_id.startswith("ed25519:") and len(trusted[0].key_id) == len("ed25519:") + 16


def test_tampered_metadata_is_refused(copy, trusted):
    # The sha256 still matches the model: only the signature can tell.
    rewrite_metadata(copy, labels=["positive", "neutral", "negative"])
    with pytest.raises(SignatureError, match="changed after signing"):
        read_artifact(copy, public_keys=trusted)


def test_tampered_model_with_matching_metadata_is_refused(copy, trusted):
    """An attacker who rewrites both files passes the sha256 check, not the signature."""
    with (copy / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    rewrite_metadata(copy, sha256=hashlib.sha256((copy / MODEL_FILE).read_bytes()).hexdigest())
    read_artifact(copy)  # the sha256 alone is satisfied: this is the hole signatures close
    with pytest.raises(SignatureError, match=r"signature\.json does not verify"):
        read_artifact(copy, public_keys=trusted)


def test_another_keys_signature_is_refused(copy, trusted, tmp_path):
    stranger = Ed25519PrivateKey.generate()
    sign_artifact(copy, stranger)
    with pytest.raises(SignatureError, match="which MODEL_PUBLIC_KEY does not trust") as raised:
        read_artifact(copy, public_keys=trusted)
    assert trusted[0].key_id in str(raised.value), "the message names the key that was expected"


def test_a_missing_signature_is_refused_when_a_key_is_set(copy, trusted):
    (copy / SIGNATURE_FILE).unlink()
    with pytest.raises(SignatureError, match=r"not signed .*signature\.json is missing"):
        load_model(copy, public_keys=trusted)


@pytest.mark.parametrize("garbage", ["not json", '{"algorithm": "ed25519"}', '{"algorithm": "rsa", "signature": ""}'])
def test_a_malformed_signature_is_refused(copy, trusted, garbage):
    (copy / SIGNATURE_FILE).write_text(garbage)
    with pytest.raises(SignatureError):
        read_artifact(copy, public_keys=trusted)


def test_any_of_several_keys_may_sign_for_rotation(copy, keys, tmp_path):
    _, new_public = generate_keypair(tmp_path / "new")
    sign_artifact(copy, load_private_key(tmp_path / "new" / PRIVATE_KEY_FILE))
    both = load_public_keys(f"{keys / PUBLIC_KEY_FILE}, {new_public}")
    _, metadata = read_artifact(copy, public_keys=both)
    assert metadata["signature"] == f"verified with key {both[1].key_id}"
    with pytest.raises(SignatureError):
        read_artifact(copy, public_keys=both[:1])


def test_signature_is_checked_before_anything_is_unpickled(copy, trusted, tmp_path):
    """A model file that runs code on load, with metadata to match: refused, and never loaded."""
    marker = tmp_path / "unpickled"
    joblib.dump(WritesAFileWhenUnpickled(marker), copy / MODEL_FILE)
    rewrite_metadata(copy, sha256=hashlib.sha256((copy / MODEL_FILE).read_bytes()).hexdigest())
    with pytest.raises(SignatureError):
        read_artifact(copy, public_keys=trusted)
    assert not marker.exists(), "the model file was unpickled before its signature was checked"
    # Control: without a key the same file IS unpickled, so the payload does work.
    with pytest.raises(ModelLoadError, match="scikit-learn Pipeline"):
        read_artifact(copy)
    assert marker.exists(), "the payload did not run even unverified: this test would prove nothing"


def test_public_key_formats_and_refusals(keys, tmp_path):
    pem = load_public_key(keys / PUBLIC_KEY_FILE)
    raw = tmp_path / "raw.pub"
    raw.write_bytes(pem.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    assert load_public_key(raw).key_id == pem.key_id
    with pytest.raises(PublicKeyError, match="unreadable"):
        load_public_key(tmp_path / "absent.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(PublicKeyError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(PublicKeyError, match="not an Ed25519 public key"):
        # The private key is no public key: a mix-up the message names.
        load_public_key(keys / PRIVATE_KEY_FILE)
    assert load_public_keys("") == ()


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    before = private.read_bytes()
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "k")
    assert private.read_bytes() == before


def test_signing_refuses_an_artifact_someone_else_could_have_written(copy, keys):
    """Signing must not launder a model the service user could have planted."""
    key = load_private_key(keys / PRIVATE_KEY_FILE)
    (copy / SIGNATURE_FILE).unlink()
    copy.chmod(0o775)
    with pytest.raises(SigningRefusedError, match=f"{copy} is owned by uid 0 with mode 0775"):
        sign_artifact(copy, key)
    copy.chmod(0o755)
    if os.geteuid() == 0:  # a parent owned by another user (the service user's state directory)
        os.chown(copy.parent, 65534, 65534)
        with pytest.raises(SigningRefusedError, match=f"{copy.parent} is owned by uid 65534"):
            sign_artifact(copy, key)
        os.chown(copy.parent, 0, 0)
    sign_artifact(copy, key)
    assert (copy / SIGNATURE_FILE).is_file()


def test_sign_unless_signed_writes_once(copy, keys):
    key = load_private_key(keys / PRIVATE_KEY_FILE)
    assert sign_unless_signed(copy, key)[1] is False, "already signed by this key: nothing to write"
    (copy / SIGNATURE_FILE).unlink()
    assert sign_unless_signed(copy, key)[1] is True
    assert sign_unless_signed(copy, key)[1] is False


def test_rewriting_an_artifact_drops_the_old_signature(copy, trusted):
    pipeline, metadata = read_artifact(copy)
    write_artifact(pipeline, {k: v for k, v in metadata.items() if k != "signature"}, copy)
    assert not (copy / SIGNATURE_FILE).exists(), "a stale signature was left next to new bytes"
    assert stat.S_IMODE((copy / MODEL_FILE).stat().st_mode) & 0o044 == 0o044, "root-trained files must stay readable"


# --- Training signs (falcon-svc train --signing-key / MODEL_SIGNING_KEY) ------------
def no_training_data(output: Path, **_: object) -> Path:
    raise DataUnavailableError("no corpus here")  # train_cli then builds the (fast) dummy


def test_train_signs_what_it_writes_with_the_key_from_the_environment(keys, trusted, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_cli, "train_model", no_training_data)
    monkeypatch.setenv(train_cli.SIGNING_KEY_ENV, str(keys / PRIVATE_KEY_FILE))
    assert train_cli.main(["--output-dir", str(tmp_path / "m")]) == 0
    assert f"signed {tmp_path / 'm'} with key {trusted[0].key_id}" in capsys.readouterr().out
    read_artifact(tmp_path / "m", public_keys=trusted)


def test_train_signs_a_kept_model_once(keys, trusted, tmp_path, monkeypatch, capsys):
    """An upgrade: a valid trained model is kept and signed if it was not (exit 5: tasks/model.yml's "changed")."""
    output = build_dummy_model(tmp_path / "m")
    rewrite_metadata(output, kind="tfidf-lexicon-logreg")
    monkeypatch.setattr(train_cli, "train_model", no_training_data)
    key = str(keys / PRIVATE_KEY_FILE)
    argv = ["--detailed-exit-code", "--atomic", "--output-dir", str(output), "--signing-key", key]
    assert train_cli.main(argv) == train_cli.EXIT_SIGNED
    assert "signed" in capsys.readouterr().out
    read_artifact(output, public_keys=trusted)
    assert train_cli.main(argv) == 0
    assert "signed" not in capsys.readouterr().out, "signed again although the signature verified"


def test_train_atomic_keeps_the_old_signed_model_loadable_until_it_swaps_in_the_new(
    keys, trusted, tmp_path, monkeypatch
):
    """A worker started at any moment of `train --atomic` loads a complete signed model.

    Writing in place (the role before this) removed the signature, then rewrote both
    files, then signed: a worker started in between exited 66, in a respawn loop.
    """
    key = load_private_key(keys / PRIVATE_KEY_FILE)
    output = build_dummy_model(tmp_path / "models" / "sentiment")
    rewrite_metadata(output, generation="old")
    sign_artifact(output, key)
    seen: list[str] = []

    def generation() -> str:
        return str(read_artifact(output, public_keys=trusted)[1].get("generation", "new"))

    def train_while_workers_start(staged: Path, **_: object) -> Path:
        seen.append(generation())
        build_dummy_model(staged)
        seen.append(generation())  # written, not yet signed
        return staged

    def publish_while_workers_start(staged: Path, model_dir: Path) -> Path:
        seen.append(generation())  # signed, not yet swapped in
        return publish_artifact(staged, model_dir)

    monkeypatch.setattr(train_cli, "train_model", train_while_workers_start)
    monkeypatch.setattr(train_cli, "publish_artifact", publish_while_workers_start)
    argv = ["--detailed-exit-code", "--atomic", "--force", "--output-dir", str(output)]
    assert train_cli.main([*argv, "--signing-key", str(keys / PRIVATE_KEY_FILE)]) == train_cli.EXIT_DUMMY
    assert seen == ["old", "old", "old"], f"a worker starting mid-training would have seen {seen}"
    assert generation() == "new"
    assert read_artifact(previous_directory(output), public_keys=trusted)[1]["generation"] == "old"
    assert sorted(p.name for p in output.parent.iterdir()) == ["sentiment", "sentiment.previous"], "staging left"
    assert stat.S_IMODE(output.stat().st_mode) == 0o755, "the swapped-in directory must be readable by the service"


def test_train_atomic_leaves_the_model_untouched_when_training_fails(keys, trusted, tmp_path, monkeypatch, capsys):
    output = build_dummy_model(tmp_path / "models" / "sentiment")
    sign_artifact(output, load_private_key(keys / PRIVATE_KEY_FILE))
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def half_written(staged: Path, **_: object) -> Path:
        (staged / MODEL_FILE).write_bytes(b"half a model")
        raise MemoryError("killed mid-fit")

    monkeypatch.setattr(train_cli, "train_model", half_written)
    argv = ["--atomic", "--force", "--output-dir", str(output), "--signing-key", str(keys / PRIVATE_KEY_FILE)]
    assert train_cli.main(argv) == train_cli.EXIT_FAILED
    assert "training failed: MemoryError" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in output.parent.iterdir()] == ["sentiment"], "the staging directory was left behind"


def test_a_reader_that_opened_the_model_before_a_swap_reads_the_old_artifact_whole(
    copy, keys, trusted, tmp_path, monkeypatch
):
    """The files are read through one handle on the directory: a swap between two reads cannot mix them."""
    rewrite_metadata(copy, generation="old")
    sign_artifact(copy, load_private_key(keys / PRIVATE_KEY_FILE))
    staged = staging_directory(copy)
    build_dummy_model(staged)
    sign_artifact(staged, load_private_key(keys / PRIVATE_KEY_FILE))
    real_open = os.open
    swapped: list[Path] = []

    def open_then_swap(path, flags, *args, **kwargs):
        handle = real_open(path, flags, *args, **kwargs)
        if str(path).endswith(METADATA_FILE) and not swapped:  # the first file read of the artifact
            swapped.append(staged)
            publish_artifact(staged, copy)
        return handle

    monkeypatch.setattr(artifact_module.os, "open", open_then_swap)
    _, metadata = read_artifact(copy, public_keys=trusted)
    monkeypatch.undo()
    assert swapped, "the swap did not happen mid-read"
    assert metadata["generation"] == "old", "the reader mixed the old and the new artifact"
    assert "generation" not in read_artifact(copy, public_keys=trusted)[1], "the new artifact was not swapped in"


def test_publish_refuses_an_incomplete_or_foreign_staging_directory(copy, tmp_path):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    staged = staging_directory(copy)
    (staged / METADATA_FILE).write_text("{}")
    with pytest.raises(ModelLoadError, match="missing"):
        publish_artifact(staged, copy)
    elsewhere = build_dummy_model(tmp_path / "elsewhere" / "model")
    with pytest.raises(ValueError, match="not in the same directory"):
        publish_artifact(elsewhere, copy)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_sign_publish_checks_the_senders_sha256_then_swaps(copy, keys, trusted, tmp_path, capsys):
    """What tasks/model.yml runs for a model shipped from the controller."""
    from falcon_svc import cli

    staged = staging_directory(copy)
    source = build_dummy_model(tmp_path / "controller" / "sentiment")
    rewrite_metadata(source, generation="shipped")
    for name in (METADATA_FILE, MODEL_FILE):
        shutil.copy(source / name, staged / name)
    sums = {name: hashlib.sha256((source / name).read_bytes()).hexdigest() for name in (METADATA_FILE, MODEL_FILE)}
    sign = ["model", "sign", str(staged), "--key", str(keys / PRIVATE_KEY_FILE), "--publish", str(copy)]
    wrong = [f"--expect-sha256={METADATA_FILE}={'0' * 64}", f"--expect-sha256={MODEL_FILE}={sums[MODEL_FILE]}"]
    assert cli.main([*sign, *wrong]) == 1
    assert "changed after it was sent" in capsys.readouterr().err
    assert "generation" not in read_artifact(copy, public_keys=trusted)[1], "a refused artifact was swapped in"
    right = [f"--expect-sha256={name}={digest}" for name, digest in sums.items()]
    assert cli.main([*sign, *right]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"signed {staged} with key {trusted[0].key_id}") and out[1].startswith("published "), out
    assert read_artifact(copy, public_keys=trusted)[1]["generation"] == "shipped"
    assert not staged.exists()


# --- Start-up policy (falcon_svc/startup.py) -------------------------------------
def test_unsigned_model_loads_with_one_warning_when_no_key_is_set(copy, caplog):
    (copy / SIGNATURE_FILE).unlink()
    with caplog.at_level(logging.INFO, logger="falcon_svc.app"):
        model = load_model_or_exit(Settings(model_dir=copy))
    assert model.metadata["signature"] == UNAUTHENTICATED
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "authenticated" in r.getMessage()
    ]
    assert len(warnings) == 1 and "MODEL_PUBLIC_KEY is unset" in warnings[0], warnings


def test_verified_model_logs_its_key_and_no_warning(signed, keys, trusted, caplog):
    with caplog.at_level(logging.INFO, logger="falcon_svc.app"):
        load_model_or_exit(Settings(model_dir=signed, model_public_key=str(keys / PUBLIC_KEY_FILE)))
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"signature verified with key {trusted[0].key_id}" in m for m in messages), messages
    assert not any("not authenticated" in m for m in messages), messages


def test_bad_signature_exits_66_naming_the_file_and_the_key(copy, keys, trusted, caplog):
    rewrite_metadata(copy, description="swapped")
    with caplog.at_level(logging.CRITICAL, logger="falcon_svc.app"), pytest.raises(SystemExit) as exited:
        load_model_or_exit(Settings(model_dir=copy, model_public_key=str(keys / PUBLIC_KEY_FILE)))
    assert exited.value.code == EXIT_NO_MODEL
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert str(copy / SIGNATURE_FILE) in line and trusted[0].key_id in line, line
    assert "make model" not in line, "retraining does not fix a signature; the hint misleads"


def test_an_unreadable_public_key_is_a_configuration_error(copy, tmp_path, caplog):
    with caplog.at_level(logging.CRITICAL, logger="falcon_svc.app"), pytest.raises(SystemExit) as exited:
        load_model_or_exit(Settings(model_dir=copy, model_public_key=str(tmp_path / "absent.pub")))
    assert exited.value.code == EXIT_CONFIG
    assert "MODEL_PUBLIC_KEY" in caplog.text and "absent.pub" in caplog.text


def test_check_command_says_which_key_verified_the_model(signed, keys, trusted, monkeypatch, capsys):
    """What the e2e check reads on the host: `falcon-svc check` as the service runs it."""
    from falcon_svc import cli

    monkeypatch.setenv("MODEL_DIR", str(signed))
    monkeypatch.setenv("MODEL_PUBLIC_KEY", str(keys / PUBLIC_KEY_FILE))
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{\n") :])
    assert shown["model_signature"] == f"verified with key {trusted[0].key_id}", shown


def test_model_commands_print_what_the_ansible_role_judges_by(tmp_path, capsys):
    """tasks/model_signing.yml reports changed only when `model sign` prints "signed "."""
    from falcon_svc import cli

    assert cli.main(["model", "keygen", str(tmp_path / "keys")]) == 0
    key_line = capsys.readouterr().out.splitlines()[-1]
    assert key_line.startswith("key id ed25519:"), key_line
    artifact = build_dummy_model(tmp_path / "model")
    sign = ["model", "sign", str(artifact), "--key", str(tmp_path / "keys" / PRIVATE_KEY_FILE)]
    assert cli.main(sign) == 0
    assert capsys.readouterr().out.startswith(f"signed {artifact} with key {key_line.removeprefix('key id ')}")
    assert cli.main(sign) == 0
    assert capsys.readouterr().out.startswith("unchanged: ")
    assert cli.main(["model", "keygen", str(tmp_path / "keys")]) == 1, "keygen must not overwrite a key"
    assert "already exists" in capsys.readouterr().err
