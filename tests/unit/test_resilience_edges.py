"""Edges of ``guarded_call`` that the breaker tests do not reach: what it reports as a call's latency."""

from __future__ import annotations

import time

from falcon_svc.resilience import CircuitBreaker, guarded_call


class Observed:
    """A latency histogram that keeps what it was given."""

    def __init__(self) -> None:
        self.amounts: list[float] = []

    def observe(self, amount: float) -> None:
        self.amounts.append(amount)


def test_the_latency_reported_is_the_calls_duration() -> None:
    latency = Observed()
    before = time.perf_counter()
    guarded_call(CircuitBreaker("redis"), lambda: "pong", latency=latency)
    elapsed = time.perf_counter() - before
    assert len(latency.amounts) == 1, f"one call observed {latency.amounts}"
    # Bounded by construction, not by timing: the call happened inside [before, before + elapsed].
    assert 0.0 <= latency.amounts[0] <= elapsed, f"latency {latency.amounts[0]} outside [0, {elapsed}]"


def test_a_failed_call_is_timed_too() -> None:
    latency = Observed()

    def fail() -> None:
        raise ConnectionError("down")

    before = time.perf_counter()
    attempt = guarded_call(CircuitBreaker("redis"), fail, latency=latency)
    elapsed = time.perf_counter() - before
    assert isinstance(attempt.error, ConnectionError), f"the failure was not returned: {attempt}"
    assert len(latency.amounts) == 1 and 0.0 <= latency.amounts[0] <= elapsed, latency.amounts
