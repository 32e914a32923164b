"""Track whether this worker is draining, and hook that to SIGTERM.

Readiness must turn 503 the moment a worker is asked to stop, so a load balancer
stops sending it new work while its in-flight requests finish.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from falcon_svc import metrics

logger = logging.getLogger(__name__)


class Lifecycle:
    """The drain flag of one worker process."""

    def __init__(self) -> None:
        self.draining = False
        self.drain_started: float | None = None
        self._exit_hooks: list[Callable[[], None]] = []

    def on_exit(self, hook: Callable[[], None]) -> None:
        """Register work to do when the worker exits (flush the request log)."""
        self._exit_hooks.append(hook)

    def run_exit_hooks(self) -> None:
        """Run the exit hooks, newest first; one failing does not stop the others."""
        while self._exit_hooks:
            hook = self._exit_hooks.pop()
            try:
                hook()
            except Exception:
                logger.exception("exit hook %r failed", hook)

    def begin_drain(self) -> None:
        """Mark the worker as draining (idempotent); readiness turns 503.

        NOTE: runs inside the signal handler, so it only sets plain attributes:
        a metric update here could deadlock on prometheus-client's lock if the
        signal interrupted one. The gauge follows in ``seconds_left``/readiness.
        """
        if not self.draining:
            self.drain_started = time.monotonic()
            self.draining = True

    def seconds_left(self, budget: float, margin: float = 1.0) -> float:
        """Return how much of a drain ``budget`` (seconds since SIGTERM) remains, less a margin."""
        metrics.DRAINING.set(1 if self.draining else 0)
        if self.drain_started is None:
            return max(budget - margin, 0.5)
        return max(budget - (time.monotonic() - self.drain_started) - margin, 0.5)

    def install_sigterm_hook(self) -> None:
        """Chain a drain mark in front of the SIGTERM handler already installed.

        NOTE: the handler only records the signal; the worker's own handler
        (gunicorn's or our meinheld worker's) still does the graceful stop.
        """
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> Any:
            self.begin_drain()
            if callable(previous):
                return previous(signum, frame)
            if previous == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)
            return None

        signal.signal(signal.SIGTERM, on_sigterm)


# One per process: gunicorn's post_worker_init hook and get_app() share it.
LIFECYCLE = Lifecycle()
