"""Serve a tiny Falcon app whose routes hang, spin or answer fast, for worker tests.

The routes are chosen to exercise a gunicorn worker rather than the service:
``/hang`` and ``/spin`` block the worker's only thread the two ways a real
handler can (a blocking call, a CPU-bound loop), ``/slow`` and ``POST /echo``
are in-flight requests to drain on shutdown, and ``/pid`` tells which worker
answered.

``/slow``, ``/hang`` and ``/spin`` write the worker's pid to
``$SLEEPY_APP_MARK_DIR/<name>.started`` when they start, so a test can act while one
is certainly in flight instead of guessing with a sleep, and knows which worker it is.

If ``$SLEEPY_APP_BOOT_GATE`` names a file, loading the app waits until that file
exists, so a test can queue requests before a worker serves anything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import falcon

# Long enough to outlast every timeout the tests use, short enough that a
# leaked worker does not linger for ever.
HANG_SECONDS = 120.0
SLOW_SECONDS = 1.0
# How long loading the app waits for $SLEEPY_APP_BOOT_GATE at most.
BOOT_GATE_SECONDS = 30.0


def _mark_started(name: str) -> None:
    """Tell the test that a blocking request has reached the app."""
    mark_dir = os.environ.get("SLEEPY_APP_MARK_DIR")
    if mark_dir:
        # Renamed into place, so the mark never exists without the pid in it.
        temp = Path(mark_dir) / f"{name}.started.{os.getpid()}.tmp"
        temp.write_text(str(os.getpid()))
        temp.replace(Path(mark_dir) / f"{name}.started")


def _wait_for_boot_gate() -> None:
    """Hold the worker's boot until the test creates the gate file, if it named one."""
    gate = os.environ.get("SLEEPY_APP_BOOT_GATE")
    if not gate:
        return
    deadline = time.monotonic() + BOOT_GATE_SECONDS
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


class Fast:
    """Answer at once."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.text = "ok"


class Pid:
    """Tell which worker process answered."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.text = str(os.getpid())


class Slow:
    """Block the worker for about a second, like a slow but healthy request."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _mark_started("slow")
        time.sleep(SLOW_SECONDS)
        resp.text = "slow ok"


class Echo:
    """Count the bytes of the request body; meinheld reads it all before calling us."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.text = str(len(req.bounded_stream.read()))


class Hang:
    """Block the worker in a sleep, like a handler stuck on I/O without a timeout."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _mark_started("hang")
        time.sleep(HANG_SECONDS)
        resp.text = "woke up"


class Spin:
    """Block the worker in a busy loop, like a handler stuck in pure-Python work."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _mark_started("spin")
        deadline = time.monotonic() + HANG_SECONDS
        while time.monotonic() < deadline:
            pass
        resp.text = "done spinning"


def create_app() -> falcon.App:
    """Build the app; one instance per worker."""
    app = falcon.App()
    app.add_route("/fast", Fast())
    app.add_route("/pid", Pid())
    app.add_route("/slow", Slow())
    app.add_route("/echo", Echo())
    app.add_route("/hang", Hang())
    app.add_route("/spin", Spin())
    return app


_wait_for_boot_gate()
app = create_app()
