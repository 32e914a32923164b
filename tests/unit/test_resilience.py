"""Circuit breaker transitions and retry backoff, with a fake clock and a fake sleep."""

from __future__ import annotations

import threading

import pytest

from falcon_svc.resilience import CircuitBreaker, RecoveryProbe, RetryPolicy, State, guarded_call, retry


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transitions() -> list[tuple[str, State, State]]:
    return []


@pytest.fixture
def breaker(clock, transitions) -> CircuitBreaker:
    return CircuitBreaker(
        "redis",
        failure_threshold=5,
        reset_timeout=60,
        clock=clock,
        on_transition=lambda name, old, new: transitions.append((name, old, new)),
    )


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.record_failure()


def test_stays_closed_below_threshold(breaker):
    fail(breaker, 4)
    assert breaker.state is State.CLOSED and breaker.allow()


def test_success_resets_the_consecutive_count(breaker):
    fail(breaker, 4)
    breaker.record_success()
    fail(breaker, 4)
    assert breaker.state is State.CLOSED


def test_opens_after_five_consecutive_failures_and_fails_fast(breaker, transitions):
    fail(breaker, 5)
    assert breaker.state is State.OPEN
    assert not breaker.allow()
    calls: list[str] = []
    attempt = guarded_call(breaker, lambda: calls.append("called"))
    assert attempt.refused and not attempt.ok and attempt.error is None
    assert calls == [], "an open breaker must not call the dependency"
    assert transitions == [("redis", State.CLOSED, State.OPEN)]


def test_half_opens_after_the_timeout_and_admits_one_trial(breaker, clock, transitions):
    fail(breaker, 5)
    clock.now += 59.9
    assert breaker.state is State.OPEN
    clock.now += 0.1
    assert breaker.state is State.HALF_OPEN
    assert breaker.allow(), "the first trial call must go through"
    assert not breaker.allow(), "only one trial at a time while half-open"
    assert transitions[-1] == ("redis", State.OPEN, State.HALF_OPEN)


def test_trial_success_closes(breaker, clock, transitions):
    fail(breaker, 5)
    clock.now += 60
    attempt = guarded_call(breaker, lambda: 42)
    assert attempt.ok and attempt.value == 42
    assert breaker.state is State.CLOSED
    assert transitions[-1] == ("redis", State.HALF_OPEN, State.CLOSED)
    fail(breaker, 4)
    assert breaker.state is State.CLOSED, "closing must reset the failure count"


def test_trial_failure_reopens_for_a_full_timeout(breaker, clock, transitions):
    fail(breaker, 5)
    clock.now += 60
    attempt = guarded_call(breaker, _raise(ConnectionError("refused")))
    assert isinstance(attempt.error, ConnectionError) and not attempt.refused and not attempt.ok
    assert breaker.state is State.OPEN
    assert transitions[-1] == ("redis", State.HALF_OPEN, State.OPEN)
    clock.now += 59
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_each_transition_is_reported_once(breaker, clock, transitions):
    fail(breaker, 8)
    for _ in range(3):
        _ = breaker.state
    assert transitions == [("redis", State.CLOSED, State.OPEN)]


def test_gauge_values():
    assert [s.gauge_value for s in (State.CLOSED, State.HALF_OPEN, State.OPEN)] == [0, 1, 2]


def _raise(ex: Exception):
    def fn():
        raise ex

    return fn


class TestRetry:
    def test_full_jitter_backoff_is_capped(self):
        policy = RetryPolicy(max_attempts=10, base_delay=0.1, max_delay=5.0)
        assert [policy.delay(n, rand=lambda: 1.0) for n in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
        assert policy.delay(3, rand=lambda: 0.5) == pytest.approx(0.4)

    def test_retries_transient_errors_then_succeeds(self):
        calls, sleeps = [], []

        def flaky():
            calls.append(1)
            if len(calls) < 3:
                raise ConnectionError("reset")
            return "ok"

        result = retry(flaky, RetryPolicy(), is_transient=lambda ex: True, sleep=sleeps.append, rand=lambda: 1.0)
        assert result == "ok" and len(calls) == 3
        assert sleeps == [0.1, 0.2]

    def test_gives_up_after_max_attempts(self):
        sleeps = []
        with pytest.raises(TimeoutError):
            retry(
                _raise(TimeoutError()), RetryPolicy(max_attempts=3), is_transient=lambda ex: True, sleep=sleeps.append
            )
        assert len(sleeps) == 2

    def test_does_not_retry_permanent_errors(self):
        sleeps = []
        with pytest.raises(ValueError):
            retry(_raise(ValueError("bad sql")), RetryPolicy(), is_transient=lambda ex: False, sleep=sleeps.append)
        assert sleeps == []


def test_healthy_only_when_closed_and_last_call_succeeded(breaker, clock):
    assert breaker.healthy
    breaker.record_failure()
    assert not breaker.healthy and breaker.state is State.CLOSED
    breaker.record_success()
    assert breaker.healthy


class FakeDependency:
    """A dependency whose health the test sets; counts the trial calls it gets."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0

    def ping(self) -> bool:
        self.calls += 1
        if not self.up:
            raise ConnectionError("refused")
        return True


class TestRecoveryProbe:
    """Close a breaker again with no request traffic: trial calls off the request path."""

    @pytest.fixture
    def dependency(self) -> FakeDependency:
        return FakeDependency()

    @pytest.fixture
    def probe(self, breaker, dependency) -> RecoveryProbe:
        probe = RecoveryProbe(dependency.ping, interval=1.0)
        probe.watch(breaker)
        return probe

    def test_leaves_a_healthy_dependency_alone(self, probe, dependency):
        assert probe.probe_once() is None
        assert dependency.calls == 0, "a healthy dependency must cost nothing"

    def test_closes_a_breaker_with_failures_once_the_dependency_answers(self, probe, breaker, dependency):
        fail(breaker, 2)
        assert probe.probe_once() is False and not breaker.healthy
        dependency.up = True
        assert probe.probe_once() is True
        assert breaker.healthy and breaker.state is State.CLOSED

    def test_an_open_breaker_gets_one_trial_per_reset_timeout(self, probe, breaker, clock, dependency):
        fail(breaker, 5)
        for _ in range(10):
            assert probe.probe_once() is None
        assert dependency.calls == 0, "an open breaker fails fast: no trial before its timeout"
        clock.now += 60
        assert probe.probe_once() is False, "the trial fails while the dependency is down"
        assert breaker.state is State.OPEN and dependency.calls == 1
        clock.now += 59
        assert probe.probe_once() is None and dependency.calls == 1
        dependency.up = True
        clock.now += 1
        assert probe.probe_once() is True
        assert breaker.healthy and dependency.calls == 2

    def test_does_nothing_without_a_breaker(self, dependency):
        probe = RecoveryProbe(dependency.ping)
        probe.start()
        assert probe.probe_once() is None and dependency.calls == 0

    def test_its_thread_closes_the_breaker_without_traffic(self, dependency):
        """The real thread, started on a failure as the service wires it (dependencies.make_breaker)."""
        closed = threading.Event()
        probe = RecoveryProbe(dependency.ping, interval=0.01)
        breaker = CircuitBreaker(
            "redis",
            failure_threshold=1,
            reset_timeout=0.05,
            on_outcome=lambda name, ok: closed.set() if ok else probe.start(),
        )
        probe.watch(breaker)
        breaker.record_failure()
        assert breaker.state is State.OPEN
        dependency.up = True
        assert closed.wait(10), "the probe thread never made a successful trial call"
        assert breaker.healthy

        def probe_threads() -> int:
            return sum(thread.name == "redis-probe" and thread.daemon for thread in threading.enumerate())

        running = probe_threads()
        assert running >= 1, "the probe thread must be a daemon: it never holds up a worker's exit"
        probe.start()  # what every later failure calls
        assert probe_threads() == running, "a second start() must not start a second thread"


# --- Found by mutation testing (`make mutation`, docs/TESTING.md) ---------------------


def test_half_open_admits_up_to_its_trial_budget_at_once(clock):
    breaker = CircuitBreaker("redis", failure_threshold=1, reset_timeout=60, half_open_max_calls=3, clock=clock)
    breaker.record_failure()
    clock.now += 60
    admitted = [breaker.allow() for _ in range(5)]
    assert admitted == [True, True, True, False, False], "half-open admits exactly half_open_max_calls trials"


def test_outcomes_are_reported_with_the_dependency_name():
    outcomes: list[tuple[str, bool]] = []
    breaker = CircuitBreaker("postgres", on_outcome=lambda name, ok: outcomes.append((name, ok)))
    guarded_call(breaker, lambda: None)
    guarded_call(breaker, _raise(ConnectionError("refused")))
    assert outcomes == [("postgres", True), ("postgres", False)], "metrics are labelled by the name reported here"


class FakeHistogram:
    def __init__(self) -> None:
        self.observed: list[float] = []

    def observe(self, amount: float) -> None:
        self.observed.append(amount)


def test_guarded_call_times_successes_and_failures_but_not_refusals(breaker):
    latency = FakeHistogram()
    guarded_call(breaker, lambda: None, latency=latency)
    guarded_call(breaker, _raise(ConnectionError("refused")), latency=latency)
    assert len(latency.observed) == 2 and all(seconds >= 0 for seconds in latency.observed)
    fail(breaker, 5)
    guarded_call(breaker, lambda: None, latency=latency)
    assert len(latency.observed) == 2, "a refused call never reached the dependency: nothing to time"


def test_guarded_call_raises_errors_it_was_not_told_to_expect(breaker):
    # A bug (a TypeError in our own code) must surface, not pass for a dead dependency.
    with pytest.raises(TypeError):
        guarded_call(breaker, _raise(TypeError("bug")), errors=(ConnectionError,))
    assert breaker.healthy, "a bug in the caller is not the dependency's failure"


def test_guarded_call_without_asking_still_records_the_outcome(breaker):
    fail(breaker, 5)
    attempt = guarded_call(breaker, lambda: "released", ask_breaker=False)
    assert attempt.ok and attempt.value == "released"
    assert breaker.state is State.CLOSED, "a success closes the breaker even when it was not asked"


def test_each_transition_logs_one_structured_warning(breaker, caplog):
    with caplog.at_level("WARNING", logger="falcon_svc.resilience"):
        fail(breaker, 5)
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == "circuit redis: closed -> open"
    fields = {name: getattr(record, name, None) for name in ("dependency", "from_state", "to_state")}
    assert fields == {"dependency": "redis", "from_state": "closed", "to_state": "open"}, (
        "the JSON log carries the transition as fields"
    )


def test_retry_reports_each_failed_attempt_by_number():
    reported: list[tuple[int, BaseException]] = []
    errors = [ConnectionError("first"), ConnectionError("second")]

    def flaky():
        if errors:
            raise errors[0]
        return "ok"

    def on_retry(attempt: int, ex: BaseException) -> None:
        reported.append((attempt, ex))
        errors.pop(0)

    result = retry(flaky, RetryPolicy(), is_transient=lambda ex: True, sleep=lambda _: None, on_retry=on_retry)
    assert result == "ok"
    assert [(attempt, str(ex)) for attempt, ex in reported] == [(1, "first"), (2, "second")]
