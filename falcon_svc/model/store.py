"""The model store: several verified versions side by side, and pointers to the one served.

Layout (``MODEL_STORE``)::

    versions/<version>/      an artifact (metadata.json, model.joblib, signature.json, report.json ...)
    active   -> versions/<v> what every worker serves
    previous -> versions/<v> the active version before the last activation (``rollback``)
    pins/<port> -> ../versions/<v>   a canary: the unit on <port> serves <v> instead
    history.jsonl            one line per activation, rollback, pin and unpin

Every pointer is a relative symlink replaced with one ``rename`` (a new link beside it,
then ``os.replace``), so a worker (re)starting at any moment reads the old version or
the new one, never none. A worker reads the pointer once and then loads from the
version directory it names, whose model files never change once imported (a report
may be added beside them). Workers take a new
pointer on a reload (gunicorn HUP: new workers start, old ones finish their requests).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falcon_svc.model.artifact import ModelLoadError, read_metadata

if TYPE_CHECKING:
    from falcon_svc.model.signing import PublicKey

VERSIONS_DIR = "versions"
PINS_DIR = "pins"
ACTIVE = "active"
PREVIOUS = "previous"
HISTORY_FILE = "history.jsonl"
# NOTE: a version names a directory and a symlink target: no slashes, no dot-names.
_VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class StoreError(Exception):
    """The store cannot do what was asked (an unknown version, no active version ...)."""


class ModelStore:
    """Read and change a model store directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # --- reading --------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Return the stored versions, oldest first (by their metadata's trained_at)."""
        directory = self.root / VERSIONS_DIR
        if not directory.is_dir():
            return []
        found = []
        for entry in directory.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # NOTE: an import in progress (.import-*) is not a version yet
            try:
                trained_at = str(read_metadata(entry).get("trained_at", ""))
            except ModelLoadError:
                trained_at = ""
            found.append((trained_at, entry.name))
        return [name for _, name in sorted(found)]

    def version_dir(self, version: str) -> Path:
        """Return the directory of ``version``; raise StoreError if the store has no such version."""
        _check_version_name(version)
        path = self.root / VERSIONS_DIR / version
        if not path.is_dir():
            known = ", ".join(self.versions()) or "none"
            raise StoreError(f"the store {self.root} has no version {version!r} (it has: {known})")
        return path

    def metadata(self, version: str) -> dict[str, Any]:
        """Return the metadata of a stored version (not verified: use load_model for that)."""
        return read_metadata(self.version_dir(version))

    def active(self) -> str | None:
        """Return the active version, or None before the first activation."""
        return self._read_pointer(self.root / ACTIVE)

    def previous(self) -> str | None:
        """Return the version that was active before the last activation, if any."""
        return self._read_pointer(self.root / PREVIOUS)

    def pinned(self, port: int) -> str | None:
        """Return the version pinned to the unit on ``port`` (a canary), if any."""
        return self._read_pointer(self.root / PINS_DIR / str(port))

    def pins(self) -> dict[int, str]:
        """Return every pin: port -> version."""
        directory = self.root / PINS_DIR
        if not directory.is_dir():
            return {}
        pins = {}
        for entry in directory.iterdir():
            version = self._read_pointer(entry) if entry.name.isdigit() else None
            if version is not None:
                pins[int(entry.name)] = version
        return pins

    def serving_version(self, port: int | None) -> str | None:
        """Return what the unit on ``port`` serves: its pin, else the active version."""
        pinned = self.pinned(port) if port is not None else None
        return pinned or self.active()

    def history(self) -> list[dict[str, Any]]:
        """Return the history lines, oldest first (a torn last line is skipped)."""
        try:
            lines = (self.root / HISTORY_FILE).read_text("utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def _read_pointer(self, link: Path) -> str | None:
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as ex:
            raise StoreError(f"{link} is not a pointer of the model store: {ex.strerror}") from ex
        return Path(target).name

    # --- changing -------------------------------------------------------------------
    def import_artifact(self, source: str | os.PathLike[str], public_keys: Sequence[PublicKey] = ()) -> str:
        """Copy the artifact in ``source`` into the store; return its version.

        It is verified first (sha256; with ``public_keys`` its signature), and copied
        under a hidden name then renamed, so a half-copied version is never listed.
        Importing a version already stored with the same bytes changes nothing; with
        other bytes under the same version it is refused.
        """
        from falcon_svc.model.artifact import read_artifact

        source = Path(source)
        _, metadata = read_artifact(source, public_keys=public_keys)
        version = str(metadata["version"])
        _check_version_name(version)
        target = self.root / VERSIONS_DIR / version
        if target.is_dir():
            stored = read_metadata(target)
            if stored.get("sha256") != metadata["sha256"]:
                raise StoreError(f"the store already has a version {version} with other model bytes")
            if public_keys:
                read_artifact(target, public_keys=public_keys)
            _copy_missing_files(source, target)
            return version
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".import-"))
        try:
            for entry in source.iterdir():
                if entry.is_file() and not entry.name.startswith("."):
                    _copy_readable(entry, staging / entry.name)
            # NOTE: what is verified is the copy the workers will load, not the source.
            read_artifact(staging, public_keys=public_keys)
            os.chmod(staging, 0o755)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._record("import", to=version)
        return version

    def activate(self, version: str, *, reason: str = "", forced: bool = False) -> str | None:
        """Point ``active`` at ``version`` (and ``previous`` at the old active); return the old active."""
        self.version_dir(version)
        old = self.active()
        if old == version:
            return old
        if old is not None:
            self._point(self.root / PREVIOUS, old)
        self._point(self.root / ACTIVE, version)
        self._record("activate", source=old, to=version, forced=forced, reason=reason)
        return old

    def rollback(self, *, reason: str = "") -> str:
        """Activate the previous version (the current active becomes previous); return it."""
        previous = self.previous()
        if previous is None:
            raise StoreError(f"the store {self.root} has no previous version to roll back to")
        old = self.active()
        if old is not None:
            self._point(self.root / PREVIOUS, old)
        self._point(self.root / ACTIVE, previous)
        self._record("rollback", source=old, to=previous, reason=reason)
        return previous

    def pin(self, port: int, version: str, *, reason: str = "") -> None:
        """Make the unit on ``port`` serve ``version`` (a canary) until unpinned."""
        self.version_dir(version)
        self._point(self.root / PINS_DIR / str(port), version, depth=1)
        self._record("pin", port=port, to=version, reason=reason)

    def unpin(self, port: int, *, reason: str = "") -> None:
        """Let the unit on ``port`` serve the active version again."""
        link = self.root / PINS_DIR / str(port)
        old = self.pinned(port)
        link.unlink(missing_ok=True)
        if old is not None:
            self._record("unpin", port=port, source=old, reason=reason)

    def _point(self, link: Path, version: str, *, depth: int = 0) -> None:
        """Replace ``link`` with a relative symlink to versions/<version> in one rename."""
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.join(*([".."] * depth), VERSIONS_DIR, version)
        temporary = link.parent / f".{link.name}.{os.getpid()}.tmp"
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary)
        os.replace(temporary, link)
        _fsync_directory(link.parent)

    def _record(self, action: str, **fields: Any) -> None:
        entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "action": action, "user": _user(), **fields}
        entry = {key: value for key, value in entry.items() if value not in (None, "", False)}
        # NOTE: O_APPEND with one write per line: concurrent writers never interleave a line.
        descriptor = os.open(self.root / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, (json.dumps(entry, sort_keys=True) + "\n").encode())
        finally:
            os.close(descriptor)


def _check_version_name(version: str) -> None:
    if not _VERSION_PATTERN.fullmatch(version):
        raise StoreError(f"{version!r} is not a model version name")


def _copy_missing_files(source: Path, target: Path) -> None:
    """Add files the stored copy lacks (a report written later); never overwrite one."""
    for entry in source.iterdir():
        if entry.is_file() and not entry.name.startswith(".") and not (target / entry.name).exists():
            _copy_readable(entry, target / entry.name)


def _copy_readable(source: Path, target: Path) -> None:
    """Copy a file readable by every user (0644), whatever the source's mode.

    NOTE: an artifact trained under umask 077 is 0600; stored as is, root's gate would
    load it and every worker (the service user) would then fail to.
    """
    shutil.copyfile(source, target)
    os.chmod(target, 0o644)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable: a power cut must not bring back the old pointer."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _user() -> str:
    """Return who made a change: the sudo user behind root if there is one."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
