"""gunicorn's own sync and gthread workers, answering their own errors in our JSON shape.

gunicorn answers what it refuses before the app runs (a malformed request line or
header, a URI over ``limit_request_line``, too many or too long headers, bad chunking)
with an HTML page from ``gunicorn.util.write_error``. A client would then get HTML from
the server and JSON from the app for the same kind of mistake. These subclasses swap
that function, in the worker process only, for one that writes
``{"error": {"code", "message", "field": null}}`` with the same status and reason.
(meinheld's own error pages come from its C core: see ``falcon_svc.workers``.)

NOTE: neither class times out a slow request head. The sync worker reads it on a
blocking socket, so a client sending a byte at a time holds the worker until the
arbiter kills it at ``timeout`` (no heartbeat meanwhile) and starts another. gthread
waits 5 s for a connection's first bytes without a thread, then parses the head in a
pool thread with no deadline while its main loop keeps heartbeating: ``threads`` such
clients stop a worker serving for as long as they like
(``test_upstream_defect_gthread_slow_request_head_holds_a_thread``). nginx in front
forwards only whole request heads (its ``client_header_timeout`` guards the rest), and
the service port is loopback-only, so this matters only to a client on the host.
meinheld, the default class, has a head deadline: see ``falcon_svc.workers``.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util
from gunicorn.workers.base import Worker
from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker
from gunicorn.workers.sync import SyncWorker as _GunicornSyncWorker

# Stable codes for the statuses gunicorn's handle_error() can answer with.
_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def error_page(status: int, reason: str, message: str) -> bytes:
    """Return a whole HTTP/1.1 error response with the service's JSON error body."""
    body = json.dumps(
        {
            "error": {
                "code": _CODES.get(status, f"http_{status}"),
                # gunicorn leaves the message empty for a 500: say something useful.
                "message": message or f"{reason}.",
                "field": None,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    return head + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Stand in for ``gunicorn.util.write_error``, with the same signature."""
    util.write_nonblock(sock, error_page(int(status_int), reason, mesg))


class _JSONErrors(Worker):
    """Mixin: install ``write_json_error`` when the worker process starts.

    It derives from gunicorn's base Worker only so that ``super().init_process()``
    has a known target; listed first, it runs before the concrete worker's own.
    """

    def init_process(self) -> None:
        # NOTE: this runs after the fork, in the worker; the master never writes
        # error pages, and its gunicorn.util stays untouched.
        util.write_error = write_json_error
        super().init_process()


class SyncWorker(_JSONErrors, _GunicornSyncWorker):
    """gunicorn's sync worker with JSON error pages."""


class ThreadWorker(_JSONErrors, _GunicornThreadWorker):
    """gunicorn's gthread worker with JSON error pages."""
