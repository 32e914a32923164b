"""The ``falcon-svc model`` command: ``keygen DIR`` and ``sign ARTIFACT --key KEY``.

The operator's side of model signing (falcon_svc/model/signing.py). Registering the
command imports nothing heavy: ``falcon-svc serve`` builds the same parser, and its
gunicorn master has no use for scikit-learn or cryptography.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PRIVATE_KEY_FILE = "model-signing.key"
PUBLIC_KEY_FILE = "model-signing.pub"


def register(commands: Any) -> None:
    """Add ``model keygen`` and ``model sign`` to the ``falcon-svc`` subcommands."""
    parser = commands.add_parser("model", help="model signing keys and signatures (falcon-svc model --help)")
    actions = parser.add_subparsers(dest="model_command", required=True)
    keygen = actions.add_parser("keygen", help=f"write {PRIVATE_KEY_FILE} (0600) and {PUBLIC_KEY_FILE} into DIR")
    keygen.add_argument("directory", type=Path, metavar="DIR")
    keygen.set_defaults(handler=keygen_command)
    sign = actions.add_parser("sign", help="write signature.json for the artifact in ARTIFACT")
    sign.add_argument("artifact", type=Path, metavar="ARTIFACT", help="the model directory")
    sign.add_argument("--key", type=Path, required=True, help="the Ed25519 private key (PEM)")
    sign.add_argument("--force", action="store_true", help="sign again even if this key's signature verifies")
    sign.add_argument(
        "--expect-sha256",
        action="append",
        default=[],
        metavar="FILE=HEX",
        help="refuse to sign unless FILE (metadata.json or model.joblib) has this sha256, e.g. the "
        "controller's, so the signature covers what was sent (repeatable)",
    )
    sign.add_argument(
        "--publish",
        type=Path,
        metavar="MODEL_DIR",
        help="then swap ARTIFACT (a staging directory beside MODEL_DIR) into MODEL_DIR atomically",
    )
    sign.set_defaults(handler=sign_command)


def keygen_command(args: argparse.Namespace) -> int:
    """Write a new key pair; refuse to overwrite one."""
    from falcon_svc.model.signing import generate_keypair, load_public_key

    try:
        private_path, public_path = generate_keypair(args.directory)
    except OSError as ex:
        print(f"falcon-svc model keygen: {ex}", file=sys.stderr)
        return 1
    print(f"wrote {private_path} (keep it off the serving host's service-readable paths) and {public_path}")
    print(f"key id {load_public_key(public_path).key_id}")
    return 0


def sign_command(args: argparse.Namespace) -> int:
    """Sign, or print "unchanged" when this key's signature already verifies (unless --force).

    NOTE: "unchanged" lets Ansible report a change only when a signature was written.
    """
    from falcon_svc.model import ModelLoadError
    from falcon_svc.model.signing import load_private_key, sign_artifact, sign_unless_signed

    try:
        private_key = load_private_key(args.key)
        check_expected_sha256(args.artifact, args.expect_sha256)
        if args.force:
            signer, signed = sign_artifact(args.artifact, private_key), True
        else:
            signer, signed = sign_unless_signed(args.artifact, private_key)
    except (OSError, ValueError, ModelLoadError) as ex:
        print(f"falcon-svc model sign: {ex}", file=sys.stderr)
        return 1
    if signed:
        print(f"signed {args.artifact} with key {signer}")
    else:
        print(f"unchanged: {args.artifact} is already signed by {signer}")
    if args.publish is not None:
        from falcon_svc.model.artifact import publish_artifact

        try:
            publish_artifact(args.artifact, args.publish)
        except (OSError, ValueError, ModelLoadError) as ex:
            print(f"falcon-svc model sign: cannot publish {args.artifact}: {ex}", file=sys.stderr)
            return 1
        print(f"published {args.artifact} as {args.publish}")
    return 0


def check_expected_sha256(artifact: Path, expectations: list[str]) -> None:
    """Raise ValueError unless each FILE=HEX names an artifact file with that sha256."""
    from falcon_svc.model.artifact import METADATA_FILE, MODEL_FILE, sha256_file

    for expectation in expectations:
        name, _, expected = expectation.partition("=")
        if name not in (METADATA_FILE, MODEL_FILE) or len(expected) != 64:
            raise ValueError(f"--expect-sha256 {expectation!r}: expected {METADATA_FILE}=HEX or {MODEL_FILE}=HEX")
        actual = sha256_file(artifact / name)
        if actual != expected.lower():
            raise ValueError(
                f"refusing to sign {artifact}: {name} has sha256 {actual[:12]}..., not the expected "
                f"{expected[:12]}... (it changed after it was sent)"
            )
