"""``falcon-svc keys add|list|revoke``: manage the API key file (``API_KEYS_FILE`` or ``--file``).

``add`` prints the new key once, on stdout, and stores only its SHA-256; there
is no way to show it again. Every change rewrites the file atomically (mode
0640, the old file's owner and group) under a lock on its directory. A running
service picks a change up on ``systemctl reload falcon-worker@N`` (SIGHUP).

On a host provisioned by Ansible the role owns the file (``falcon_svc_api_keys``):
run ``keys add`` with ``--file`` pointing elsewhere to make a key, and put the
printed id and sha256 into the inventory instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from falcon_svc.auth.keys import (
    KeyFileError,
    KeyRecord,
    generate_key,
    key_sha256,
    locked_directory,
    read_key_file,
    today,
    valid_key_id,
    write_key_file,
)

EXIT_USAGE = 2


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]  # argparse's private generic
    """Add the ``keys`` command and its subcommands to the ``falcon-svc`` parser."""
    keys_parser = commands.add_parser("keys", help="add, list or revoke API keys (API_KEYS_FILE or --file)")
    actions = keys_parser.add_subparsers(dest="keys_action", required=True)
    add = actions.add_parser("add", help="make a key for ID, print it once, store its hash")
    add.add_argument("key_id", metavar="ID", help="the client's id: 1 to 64 of A-Z a-z 0-9 . -")
    add.add_argument("--comment", default="", help="free text kept on the key's line (who, what for)")
    actions.add_parser("list", help="print each key's id and creation date as JSON lines (never a hash)")
    revoke = actions.add_parser("revoke", help="remove ID's key")
    revoke.add_argument("key_id", metavar="ID")
    for action in actions.choices.values():
        action.add_argument("--file", type=Path, help="the key file (default: $API_KEYS_FILE)")
    keys_parser.set_defaults(handler=run)


def _key_file(args: argparse.Namespace) -> Path | None:
    if args.file is not None:
        return Path(args.file)
    configured = os.environ.get("API_KEYS_FILE", "").strip()
    return Path(configured) if configured else None


def run(args: argparse.Namespace) -> int:
    """Run one ``keys`` subcommand; errors are one line on stderr and a non-zero exit."""
    path = _key_file(args)
    if path is None:
        print("keys: no key file: set API_KEYS_FILE or pass --file", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.keys_action == "list":
            return _list(path)
        with locked_directory(path):
            if args.keys_action == "add":
                return _add(path, args.key_id, args.comment)
            return _revoke(path, args.key_id)
    except (KeyFileError, OSError) as ex:
        print(f"keys: {ex}", file=sys.stderr)
        return 1


def _existing(path: Path) -> list[KeyRecord]:
    return read_key_file(path) if path.exists() else []


def _list(path: Path) -> int:
    for record in _existing(path):
        print(json.dumps({"id": record.key_id, "created": record.created or None, "comment": record.comment}))
    return 0


def _add(path: Path, key_id: str, comment: str) -> int:
    if not valid_key_id(key_id):
        print(
            f"keys: {key_id[:80]!r} is not 1 to 64 of A-Z a-z 0-9 . - (starting with a letter or digit)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if any(char in comment for char in "\r\n"):
        print("keys: a comment is one line", file=sys.stderr)
        return EXIT_USAGE
    records = _existing(path)
    if any(record.key_id == key_id for record in records):
        print(f"keys: {key_id!r} already has a key; revoke it first, or choose another id", file=sys.stderr)
        return 1
    key = generate_key(key_id)
    record = KeyRecord(key_id, key_sha256(key), today(), " ".join(comment.split()))
    write_key_file(path, [*records, record])
    print(key)
    print(
        f"keys: added {key_id!r} to {path} (sha256 {record.sha256}); the key above is shown only this once. "
        "Reload the service to accept it: systemctl reload 'falcon-worker@*'",
        file=sys.stderr,
    )
    return 0


def _revoke(path: Path, key_id: str) -> int:
    records = _existing(path)
    kept = [record for record in records if record.key_id != key_id]
    if len(kept) == len(records):
        print(f"keys: no key with id {key_id[:80]!r} in {path}", file=sys.stderr)
        return 1
    write_key_file(path, kept)
    print(
        f"keys: revoked {key_id!r} in {path}. Reload the service to refuse it: systemctl reload 'falcon-worker@*'",
        file=sys.stderr,
    )
    return 0
