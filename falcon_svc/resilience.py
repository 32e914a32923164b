"""Circuit breakers and retries: how falcon-svc survives Redis and PostgreSQL failures.

A breaker per dependency stops calling it after repeated failures, so a dead
server costs microseconds instead of a timeout on every request; after a pause it
lets a few trial calls through and closes again when they succeed. Retries with
exponential backoff and full jitter belong off the request path (the log writer);
the request path tries once with a short timeout and degrades. A recovery probe
trial-calls a dependency off the request path, so a breaker also closes when no
request happens to use the dependency.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Never, Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Attempt is immutable, so an Attempt[bool] is an Attempt[object]: the one REFUSED
# instance (an Attempt[Never]) then serves every guarded_call, whatever it returns.
T_co = TypeVar("T_co", covariant=True)


class State(StrEnum):
    """Breaker states; the gauge value is the index (closed 0, half-open 1, open 2)."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge_value(self) -> int:
        return (State.CLOSED, State.HALF_OPEN, State.OPEN).index(self)


Transition = Callable[[str, State, State], None]


class CircuitBreaker:
    """Count consecutive failures of one dependency and stop calling it when they pile up.

    closed -> open after ``failure_threshold`` consecutive failures; open fails
    fast for ``reset_timeout`` seconds; then half-open admits up to
    ``half_open_max_calls`` concurrent trial calls: a success closes the breaker,
    a failure re-opens it for another ``reset_timeout``.

    Thread-safe: gthread workers and the log writer thread share breakers.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition | None = None,
        on_outcome: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._reset_timeout = reset_timeout
        self._half_open_max = half_open_max_calls
        self._clock = clock
        self._on_transition = on_transition
        self._on_outcome = on_outcome
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0

    @property
    def state(self) -> State:
        """Return the state now (an expired open breaker reads as half-open)."""
        with self._lock:
            self._expire_open()
            return self._state

    @property
    def healthy(self) -> bool:
        """Tell whether the last call succeeded and the breaker is closed."""
        with self._lock:
            self._expire_open()
            return self._state is State.CLOSED and self._failures == 0

    def allow(self) -> bool:
        """Tell whether a call may go ahead now; a half-open breaker counts it as a trial."""
        with self._lock:
            self._expire_open()
            if self._state is State.CLOSED:
                return True
            if self._state is State.HALF_OPEN and self._trials < self._half_open_max:
                self._trials += 1
                return True
            return False

    def record_success(self) -> None:
        """Note a successful call: resets the count, closes a half-open breaker."""
        if self._on_outcome is not None:
            self._on_outcome(self.name, True)
        with self._lock:
            self._failures = 0
            if self._state is not State.CLOSED:
                self._move(State.CLOSED)

    def record_failure(self) -> None:
        """Note a failed call: may open the breaker."""
        if self._on_outcome is not None:
            self._on_outcome(self.name, False)
        with self._lock:
            self._failures += 1
            if self._state is State.HALF_OPEN or (self._state is State.CLOSED and self._failures >= self._threshold):
                self._opened_at = self._clock()
                self._move(State.OPEN)

    def _expire_open(self) -> None:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self._reset_timeout:
            self._move(State.HALF_OPEN)

    def _move(self, new: State) -> None:
        old, self._state = self._state, new
        self._trials = 0
        if new is State.CLOSED:
            self._failures = 0
        logger.warning(
            "circuit %s: %s -> %s",
            self.name,
            old.value,
            new.value,
            extra={"dependency": self.name, "from_state": old.value, "to_state": new.value},
        )
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)


class LatencyObserver(Protocol):
    """What ``guarded_call`` reports a call's duration to (a bound Prometheus histogram)."""

    def observe(self, amount: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Attempt(Generic[T_co]):
    """What became of one guarded call: its value, its error, or refused by an open breaker."""

    value: T_co | None = None
    error: BaseException | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        return not self.refused and self.error is None


REFUSED: Attempt[Never] = Attempt(refused=True)


def guarded_call(
    breaker: CircuitBreaker,
    fn: Callable[[], T],
    *,
    errors: tuple[type[BaseException], ...] = (Exception,),
    latency: LatencyObserver | None = None,
    ask_breaker: bool = True,
) -> Attempt[T]:
    """Call a dependency through its breaker: refuse if open, time the call, record the outcome.

    An exception in ``errors`` is recorded as a failure and returned, never
    raised: callers degrade instead of failing a request. Anything else is a bug
    and propagates. ``ask_breaker=False`` skips the admission check for calls that
    must be tried even while the breaker is open (releasing a claim), but still
    records their outcome.
    """
    if ask_breaker and not breaker.allow():
        return REFUSED
    started = time.perf_counter()
    try:
        value = fn()
    except errors as ex:
        breaker.record_failure()
        return Attempt(error=ex)
    finally:
        if latency is not None:
            latency.observe(time.perf_counter() - started)
    breaker.record_success()
    return Attempt(value)


class RecoveryProbe:
    """Trial-call a dependency off the request path, so its breaker closes without traffic.

    Why: otherwise the breaker's only trial calls are requests that use the
    dependency, and some traffic never does (short texts skip Redis), so a worker
    would keep reporting Redis down (``degraded``, ``falcon_dependency_up`` 0, the
    alert) long after it came back. Every ``interval`` seconds, while the watched
    breaker is unhealthy, one cheap ``check`` (a PING) goes through the breaker,
    which still rations it: at most one trial per ``reset_timeout`` while open.

    The thread starts on ``start()`` (wired to the breaker's failures, so it runs
    in the worker, after gunicorn's fork, and never while the dependency is fine)
    and then lives until ``stop()`` (the worker's exit): a wake-up a second costs
    nothing, and a thread that exited once healthy could race a new failure and
    leave nobody probing.
    """

    def __init__(self, check: Callable[[], object], *, interval: float = 1.0) -> None:
        self._check = check
        self._interval = interval
        self._breaker: CircuitBreaker | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def watch(self, breaker: CircuitBreaker) -> None:
        """Probe through ``breaker`` (set once, before ``start``; the breaker's hook calls ``start``)."""
        self._breaker = breaker

    def start(self) -> None:
        """Start the probe thread once; idempotent and cheap, so a breaker may call it on every failure."""
        if self._thread is not None or self._breaker is None or self._stopped.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self._breaker.name}-probe", daemon=True)
                self._thread.start()

    def probe_once(self) -> bool | None:
        """Make one trial call if the breaker is unhealthy and admits it; return its outcome, or None."""
        breaker = self._breaker
        if breaker is None or breaker.healthy:
            return None
        attempt = guarded_call(breaker, self._check)
        return None if attempt.refused else attempt.ok

    def stop(self) -> None:
        """End the probe thread (if any) at its next wake-up; it is never started again."""
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self.probe_once()
            except Exception:  # pragma: no cover - a bug; keep probing
                logger.exception("recovery probe failed")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n sleeps uniform(0, min(cap, base * 2**n))."""

    max_attempts: int = 3
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Return the sleep before retry number ``attempt`` (0-based)."""
        return rand() * min(self.max_delay, self.base_delay * 2.0**attempt)


def retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    is_transient: Callable[[BaseException], bool],
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException], None] | None = None,
    rand: Callable[[], float] = random.random,
) -> T:
    """Call ``fn`` up to ``policy.max_attempts`` times, sleeping between transient failures.

    A non-transient error (a bad query, a constraint) is raised at once: retrying
    cannot fix it.
    """
    for attempt in range(policy.max_attempts):
        try:
            return fn()
        except Exception as ex:
            if attempt + 1 >= policy.max_attempts or not is_transient(ex):
                raise
            if on_retry is not None:
                on_retry(attempt + 1, ex)
            sleep(policy.delay(attempt, rand))
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
