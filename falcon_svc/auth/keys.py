"""API keys: the token format, the key file, and the store a request's key is checked against.

A key is ``fsk_<id>_<secret>``: the id (1 to 64 of ``A-Z a-z 0-9 . -``, no ``_``)
names the client, so the store finds the one record to compare with a dict
lookup instead of hashing against every line; the secret is 32 random bytes
(``secrets.token_urlsafe``: 256 bits).

Only the SHA-256 of the whole key is stored. A slow password hash (bcrypt,
scrypt, argon2) exists to make guessing a low-entropy *password* from its hash
expensive; a 256-bit random secret cannot be guessed from its SHA-256 at any
hash speed, while a slow hash would cost tens of milliseconds of CPU on every
request (and hand anyone a cheap way to burn it). Checking a key is one dict
lookup, one SHA-256 and ``hmac.compare_digest``: a few microseconds.

The key file holds one key per line::

    <id> <sha256 hex of the key> [<created YYYY-MM-DD> [comment ...]]

A ``-`` in the created field stands for a date not known, so a line can carry
a comment without one. Blank lines and lines starting with ``#`` are ignored. A
file is parsed whole or refused whole (``KeyFileError`` names the line): a
half-read file never becomes the keys a service accepts.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "fsk_"
# The id is one part of the key and the idempotency scope (falcon_svc.idempotency.scoped_key
# takes A-Z a-z 0-9 . _ -): no "_", so "fsk_<id>_<secret>" splits one way only.
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# The created field of a line with a comment but no date (the field is positional).
NO_DATE = "-"
SECRET_BYTES = 32
# A presented key longer than this is not one of ours: refused before it is hashed.
MAX_KEY_CHARS = 256
KEY_FILE_MODE = 0o640


class KeyFileError(ValueError):
    """The key file cannot be read, or a line of it breaks the format (the message names it)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One line of the key file: an id, the SHA-256 of its key, when and why it was made."""

    key_id: str
    sha256: str
    created: str = ""
    comment: str = ""

    def line(self) -> str:
        """Return the record as a key-file line (``-`` fills the created field of an undated comment)."""
        created = self.created or (NO_DATE if self.comment else "")
        return " ".join(part for part in (self.key_id, self.sha256, created, self.comment) if part)


def valid_key_id(key_id: str) -> bool:
    """Tell whether ``key_id`` is 1 to 64 of ``A-Z a-z 0-9 . -``, starting with a letter or digit."""
    return _KEY_ID.fullmatch(key_id) is not None


def key_sha256(key: str) -> str:
    """Return the hex SHA-256 of ``key`` (what the key file stores)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def generate_key(key_id: str) -> str:
    """Return a new key ``fsk_<key_id>_<secret>`` with a 256-bit random secret.

    Raises:
        ValueError: ``key_id`` is not a valid id.
    """
    if not valid_key_id(key_id):
        raise ValueError(f"key id {key_id[:80]!r} is not 1 to 64 of A-Z a-z 0-9 . - (starting with a letter or digit)")
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def key_id_of(key: str) -> str | None:
    """Return the id a presented key names, or None if it is not shaped like one of ours."""
    if len(key) > MAX_KEY_CHARS or not key.startswith(KEY_PREFIX):
        return None
    key_id, separator, secret = key[len(KEY_PREFIX) :].partition("_")
    if not separator or not secret or not valid_key_id(key_id):
        return None
    return key_id


class KeyStore:
    """The keys a service accepts, by id: immutable, so a reload swaps a whole store."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._records = {record.key_id: record for record in records}
        # NOTE: digests as bytes once, so a check hashes only the presented key.
        self._digests = {record.key_id: bytes.fromhex(record.sha256) for record in self._records.values()}

    def authenticate(self, key: str) -> str | None:
        """Return the id of ``key`` if it is one of ours, else None.

        The digests are compared with ``hmac.compare_digest`` (constant time), so
        the comparison's timing says nothing about how much of a guess matched.
        Whether an id exists is not hidden: ids are not secrets.
        """
        key_id = key_id_of(key)
        if key_id is None:
            return None
        expected = self._digests.get(key_id)
        if expected is None:
            return None
        presented = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        return key_id if hmac.compare_digest(expected, presented) else None

    def records(self) -> list[KeyRecord]:
        """Return the records in file order."""
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)


def parse_key_file(text: str, source: str = "key file") -> list[KeyRecord]:
    """Parse a key file's text into records, all or nothing.

    Raises:
        KeyFileError: a line is malformed or an id repeats (``source:line: why``).
    """
    records: list[KeyRecord] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(maxsplit=3)
        where = f"{source}:{number}"
        if len(fields) < 2:
            raise KeyFileError(f"{where}: expected '<id> <sha256>', got {len(fields)} field")
        key_id, digest = fields[0], fields[1]
        if not valid_key_id(key_id):
            raise KeyFileError(f"{where}: key id {key_id[:80]!r} is not 1 to 64 of A-Z a-z 0-9 . -")
        if not _SHA256_HEX.fullmatch(digest):
            # NOTE: the value is not echoed: a key pasted here by mistake must not reach the log.
            raise KeyFileError(f"{where}: the hash of {key_id!r} is not 64 lowercase hex digits")
        created = fields[2] if len(fields) > 2 and fields[2] != NO_DATE else ""
        if created and not _DATE.fullmatch(created):
            raise KeyFileError(f"{where}: created date {created[:40]!r} of {key_id!r} is not YYYY-MM-DD")
        if key_id in seen:
            raise KeyFileError(f"{where}: key id {key_id!r} appears twice")
        seen.add(key_id)
        records.append(KeyRecord(key_id, digest, created, fields[3] if len(fields) > 3 else ""))
    return records


def read_key_file(path: Path) -> list[KeyRecord]:
    """Read and parse the key file at ``path``, all or nothing.

    Raises:
        KeyFileError: unreadable, not UTF-8, or malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as ex:
        raise KeyFileError(f"cannot read API key file {path}: {ex}") from ex
    return parse_key_file(text, str(path))


def load_key_store(path: Path) -> KeyStore:
    """Return the store of the key file at ``path`` (raises ``KeyFileError`` as ``read_key_file``)."""
    return KeyStore(read_key_file(path))


def today() -> str:
    """Return today's UTC date as the key file writes it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


@contextlib.contextmanager
def locked_directory(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s directory, so two ``keys`` commands never lose a line."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_key_file(path: Path, records: Iterable[KeyRecord]) -> None:
    """Replace the key file with ``records`` atomically: a reader sees the old file or the new, whole.

    The new file is written beside the old one, made mode 0640 with the old
    file's owner and group (else the directory's group: the service reads it
    through its group), flushed to disk, then renamed over the old.

    Raises:
        OSError: the file could not be written or given its owner; the old file is left as it was.
    """
    try:
        reference = path.stat()
    except FileNotFoundError:
        reference = path.parent.stat()
        owner = -1  # a new file keeps the writer as its owner
    else:
        owner = reference.st_uid
    body = "".join(record.line() + "\n" for record in records)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as temp:
            os.fchmod(temp.fileno(), KEY_FILE_MODE)
            stat = os.fstat(temp.fileno())
            if (owner not in (-1, stat.st_uid)) or reference.st_gid != stat.st_gid:
                os.fchown(temp.fileno(), owner, reference.st_gid)
            temp.write(body)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    # NOTE: the rename is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
