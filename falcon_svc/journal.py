"""Speak journald's native protocol: one datagram per entry, with fields journalctl can filter.

Under systemd a unit's stdout lines all land at one priority (6, info) with no
fields of ours; an entry sent as a datagram to ``/run/systemd/journal/socket``
carries ``PRIORITY``, ``SYSLOG_IDENTIFIER`` and any ``NAME=value`` we add
(systemd's "Native Journal Protocol": ``NAME=value\\n`` lines, and for a value
holding a newline ``NAME\\n`` + its length as 64-bit little-endian + the bytes + ``\\n``).

Why our own sender, not a library: the protocol is one ``sendto()`` of bytes we
build, stable since systemd 38. Debian's python3-systemd lives outside the venv
(system site-packages, tied to the system Python); systemd-python from PyPI needs
a compiler and libsystemd-dev on every host we install on; cysystemd adds a C
extension (and its release cadence) for the same single call. Ours also costs
less per request: the fields that never change in a worker are encoded once
(falcon_svc/logs.py), where libraries rebuild every field from keyword arguments
each call (scripts/bench/bench_access_log.py measures it).

When: only when ``JOURNAL_STREAM`` (set by systemd when stdout goes to the
journal) names the device:inode of our stdout. ``make run``, tests, a pipe or a
file keep plain JSON lines on stdout.

Failure semantics: ``send()`` never raises and never blocks (a non-blocking
socket; the datagram is local). It returns False when the entry was not queued:
socket missing, journald behind (EAGAIN), entry too large (EMSGSIZE; libsystemd
would pass a memfd, we do not). The caller then writes the line to stdout, which
is the journal stream, so no line is lost (only its fields).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# NOTE: tests only: points the sender at a socket a test binds in place of journald's.
JOURNAL_SOCKET_OVERRIDE_ENV = "FALCON_JOURNAL_SOCKET"

_LENGTH = struct.Struct("<Q")


def journal_field(name: bytes, value: str) -> bytes:
    """Encode one field: ``NAME=value\\n``, or the length-prefixed form when the value holds a newline or NUL."""
    data = value.encode("utf-8", "backslashreplace")
    if b"\n" in data or b"\0" in data:
        return name + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
    return name + b"=" + data + b"\n"


def priority_for(levelno: int) -> int:
    """Map a ``logging`` level to a syslog priority (0 emerg ... 7 debug)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stream_is_journal(stream: TextIO, journal_stream: str | None) -> bool:
    """Tell whether ``stream`` is the journal stream ``JOURNAL_STREAM`` ("device:inode") names."""
    if not journal_stream:
        return False
    try:
        device, inode = (int(part) for part in journal_stream.split(":"))
        status = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # Not two numbers, or a stream with no descriptor (StringIO, pytest's capture).
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


class JournalSender:
    """Send ready-encoded entries to journald's socket without blocking.

    NOTE: the socket is connected once, not addressed on every send: ``sendto()``
    with a path looks the path up each time (~1 us of the request path). When
    journald restarts, its socket is a new one and sends fail (ECONNREFUSED):
    the sender then connects afresh, once per failing entry.
    """

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.last_error = ""
        self._sock: socket.socket | None = None

    def send(self, entry: bytes) -> bool:
        """Queue one entry; False (never an exception) when journald did not take it."""
        try:
            if self._sock is not None:
                try:
                    self._sock.send(entry)
                    return True
                except (ConnectionError, FileNotFoundError):
                    self.close()  # journald restarted, or its socket went away: connect afresh below
            self._connect().send(entry)
            return True
        except OSError as ex:
            self.last_error = os.strerror(ex.errno) if ex.errno else type(ex).__name__
            return False

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return sock

    def close(self) -> None:
        """Close the socket (the next send connects again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_SENDERS: dict[str, JournalSender] = {}


def sender_for(stream: TextIO, environ: dict[str, str] | os._Environ[str] = os.environ) -> JournalSender | None:
    """Return the process's sender when ``stream`` goes to the journal, else None (plain lines).

    One sender (one socket) per path, shared by every handler: ``configure_logging``
    runs more than once per process. A forked worker inherits the master's socket,
    which is safe: each ``sendto()`` is one whole datagram.
    """
    if not stream_is_journal(stream, environ.get("JOURNAL_STREAM")):
        return None
    path = environ.get(JOURNAL_SOCKET_OVERRIDE_ENV) or JOURNAL_SOCKET
    sender = _SENDERS.get(path)
    if sender is None:
        sender = _SENDERS[path] = JournalSender(path)
    return sender


def decode_entry(entry: bytes) -> dict[str, str]:
    """Decode an entry the way journald does: the inverse of ``journal_field``, for tests and the bench."""
    fields: dict[str, str] = {}
    at = 0
    while at < len(entry):
        end = entry.index(b"\n", at)
        line = entry[at:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            at = end + 1
        else:
            name = line
            (size,) = _LENGTH.unpack_from(entry, end + 1)
            start = end + 1 + _LENGTH.size
            value = entry[start : start + size]
            at = start + size + 1
        fields[name.decode()] = value.decode()
    return fields
