"""The drain flag, the drain budget, the exit hooks and the SIGTERM chain of one worker."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from types import FrameType

import pytest
from prometheus_client import REGISTRY

from falcon_svc.lifecycle import Lifecycle


def draining_gauge() -> float | None:
    return REGISTRY.get_sample_value("falcon_worker_draining")


class TestDrainBudget:
    def test_before_a_drain_the_whole_budget_less_the_margin_is_left(self):
        lifecycle = Lifecycle()
        assert lifecycle.seconds_left(30.0) == 29.0
        assert lifecycle.seconds_left(30.0, margin=5.0) == 25.0

    def test_the_budget_never_drops_below_half_a_second(self):
        lifecycle = Lifecycle()
        assert lifecycle.seconds_left(1.2) == 0.5, "budget - margin is 0.2: the floor applies"
        lifecycle.drain_started = time.monotonic() - 100.0
        assert lifecycle.seconds_left(30.0) == 0.5, "a drain older than its budget still gets the floor"

    def test_time_spent_draining_is_taken_off_the_budget(self):
        lifecycle = Lifecycle()
        lifecycle.begin_drain()
        assert lifecycle.drain_started is not None
        # Pretend SIGTERM came 10 s ago: 30 - 10 - 1 = 19 s are left, less the time this line takes.
        lifecycle.drain_started -= 10.0
        left = lifecycle.seconds_left(30.0)
        assert 10.0 < left <= 19.0, f"expected about 19 s left of a 30 s budget 10 s into the drain, got {left}"

    def test_the_draining_gauge_follows_the_flag(self):
        lifecycle = Lifecycle()
        lifecycle.seconds_left(30.0)
        assert draining_gauge() == 0
        lifecycle.begin_drain()
        lifecycle.seconds_left(30.0)
        assert draining_gauge() == 1


def test_begin_drain_is_idempotent():
    lifecycle = Lifecycle()
    assert lifecycle.draining is False and lifecycle.drain_started is None
    lifecycle.begin_drain()
    first = lifecycle.drain_started
    assert lifecycle.draining is True and first is not None
    lifecycle.begin_drain()
    assert lifecycle.drain_started == first, "a second SIGTERM must not restart the drain clock"


def test_exit_hooks_run_newest_first_and_a_failure_stops_none(caplog):
    lifecycle = Lifecycle()
    ran: list[str] = []

    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("flush failed")

    lifecycle.on_exit(lambda: ran.append("first"))
    lifecycle.on_exit(broken)
    lifecycle.on_exit(lambda: ran.append("last"))
    with caplog.at_level(logging.ERROR, logger="falcon_svc.lifecycle"):
        lifecycle.run_exit_hooks()
    assert ran == ["last", "broken", "first"]
    (record,) = caplog.records
    assert record.getMessage() == f"exit hook {broken!r} failed", "the log line must name the hook that failed"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    lifecycle.run_exit_hooks()
    assert ran == ["last", "broken", "first"], "hooks run once"


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    """Put this process's SIGTERM handler back after a test replaces it."""
    saved = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


@pytest.mark.usefixtures("sigterm_restored")
def test_sigterm_marks_the_drain_then_calls_the_previous_handler():
    calls: list[tuple[int, FrameType | None, bool]] = []
    lifecycle = Lifecycle()

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append((signum, frame, lifecycle.draining))

    signal.signal(signal.SIGTERM, previous)
    lifecycle.install_sigterm_hook()
    signal.raise_signal(signal.SIGTERM)
    assert len(calls) == 1, "the worker's own handler must still run: it does the graceful stop"
    signum, frame, draining_then = calls[0]
    assert signum == signal.SIGTERM and frame is not None, "the previous handler gets the signal and frame"
    assert draining_then, "readiness must already be 503 when the worker starts stopping"


def sigterm_in_a_child(previous: int) -> int:
    """Install the hook over ``previous`` here, raise SIGTERM in a forked child; return the child's wait status.

    NOTE: the hook is installed in this process, so mutation testing (which maps code to the
    tests that run it in-process) sees this test exercise it; the signal is raised only in
    the child, which inherits the handler, so pytest itself never gets SIGTERM.
    """
    signal.signal(signal.SIGTERM, previous)
    lifecycle = Lifecycle()
    lifecycle.install_sigterm_hook()
    pid = os.fork()
    if pid == 0:  # the child: leaves only through os._exit, never back into pytest
        code = 4
        try:
            signal.raise_signal(signal.SIGTERM)
            code = 0 if lifecycle.draining else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.usefixtures("sigterm_restored")
def test_sigterm_with_an_ignored_previous_handler_only_marks_the_drain():
    status = sigterm_in_a_child(signal.SIG_IGN)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the child should drain and live on: {status:#x}"


@pytest.mark.usefixtures("sigterm_restored")
def test_sigterm_with_the_default_previous_handler_still_terminates():
    """Without a handler to chain to, the hook must not swallow SIGTERM: the process still dies of it."""
    status = sigterm_in_a_child(signal.SIG_DFL)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, f"wait status {status:#x}"
