"""`falcon-svc models canary`: the decision with numbers, the PromQL it runs, the evidence, the sequence.

The store, the units and Prometheus are fakes of the canary's own seams (``CanaryStore``,
``Hooks``); tests/integration/test_canary_prometheus.py runs the same code against real servers.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from falcon_svc import canary
from falcon_svc.canary import (
    CanaryError,
    Hooks,
    Limits,
    Observation,
    Plan,
    Side,
    decide,
    evidence_table,
    label_shares,
    label_shift,
    observe,
    run_canary,
    side_queries,
)
from falcon_svc.cli import main
from falcon_svc.model.store import ModelStore

LIMITS = Limits()
MIX = {"negative": 300.0, "neutral": 200.0, "positive": 500.0}
# A healthy side: 1000 inference requests, two 5xx, p99 5 ms, the usual mix.
GOOD = Observation(requests=1000, errors=2, p99_seconds=0.005, label_counts=MIX)


def failed(verdict: canary.Verdict) -> list[str]:
    return [check.metric for check in verdict.checks if not check.passed]


def test_a_canary_like_the_others_is_promoted() -> None:
    verdict = decide(GOOD, GOOD, LIMITS)
    assert verdict.promote and failed(verdict) == [] and verdict.reasons == []


@pytest.mark.parametrize(
    ("canary_side", "metric", "reason"),
    [
        (replace(GOOD, errors=2 + 11), "5xx error ratio", "5xx ratio 0.0130 > others' 0.0020 + 0.01"),
        (replace(GOOD, p99_seconds=0.005 * 1.5 + 0.025 + 0.001), "p99 latency", "p99 33.5 ms > 32.5 ms"),
        (
            replace(GOOD, label_counts={"negative": 950.0, "neutral": 25.0, "positive": 25.0}),
            "predicted-label mix",
            "label mix shifted: TVD 0.650 > 0.15",
        ),
        (
            replace(GOOD, requests=99, errors=0),
            "inference requests",
            "not enough traffic to judge: the canary answered 99 inference requests (< 100)",
        ),
    ],
    ids=["errors", "latency", "labels", "traffic"],
)
def test_each_check_fails_alone(canary_side: Observation, metric: str, reason: str) -> None:
    verdict = decide(canary_side, GOOD, LIMITS)
    assert not verdict.promote
    assert failed(verdict) == [metric], f"only {metric} should fail: {evidence_table(verdict)}"
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith(reason), verdict.reasons


def test_each_limit_is_inclusive_at_the_edge() -> None:
    at_the_edge = Observation(
        requests=1000,
        errors=2 + 10,  # exactly one point more
        p99_seconds=0.005 * 1.5 + 0.025,
        label_counts={"negative": 450.0, "neutral": 50.0, "positive": 500.0},  # TVD 0.15
    )
    verdict = decide(at_the_edge, GOOD, LIMITS)
    assert verdict.promote, evidence_table(verdict)


def test_too_little_traffic_on_the_others_is_no_baseline() -> None:
    verdict = decide(GOOD, replace(GOOD, requests=40, errors=0), LIMITS)
    assert failed(verdict) == ["inference requests"]
    assert "the others answered 40" in verdict.reasons[0]


def test_a_canary_without_any_traffic_is_rolled_back_with_that_reason() -> None:
    idle = Observation(requests=0, errors=0, p99_seconds=None, label_counts={})
    verdict = decide(idle, GOOD, LIMITS)
    assert not verdict.promote
    assert verdict.reasons[0].startswith("not enough traffic to judge: the canary answered 0")
    assert set(failed(verdict)) == {"inference requests", "5xx error ratio", "p99 latency", "predicted-label mix"}


def test_latency_slack_forgives_a_few_ms_at_low_load() -> None:
    # 4 ms against 2 ms is twice as slow, but one slow request at low load does that.
    verdict = decide(replace(GOOD, p99_seconds=0.004), replace(GOOD, p99_seconds=0.002), LIMITS)
    assert verdict.promote, evidence_table(verdict)
    strict = replace(LIMITS, p99_slack_seconds=0.0)
    assert failed(decide(replace(GOOD, p99_seconds=0.004), replace(GOOD, p99_seconds=0.002), strict)) == ["p99 latency"]


def test_label_shift_is_the_total_variation_distance() -> None:
    assert label_shares({"negative": 30, "positive": 10}) == {"negative": 0.75, "positive": 0.25}
    assert label_shares({}) == {}
    assert label_shift({"negative": 0.5, "positive": 0.5}, {"negative": 0.9, "positive": 0.1}) == pytest.approx(0.4)
    # A label only one side predicts counts in full.
    assert label_shift({"negative": 1.0}, {"neutral": 0.5, "positive": 0.5}) == pytest.approx(1.0)
    assert (
        label_shift(
            {"negative": 0.2, "neutral": 0.3, "positive": 0.5}, {"negative": 0.2, "neutral": 0.3, "positive": 0.5}
        )
        == 0
    )
    assert label_shift({"negative": 0.6, "neutral": 0.4}, {"negative": 0.5, "neutral": 0.3, "positive": 0.2}) == (
        pytest.approx(0.2)
    )


def test_side_queries_select_the_units_inference_routes_and_the_window() -> None:
    queries = side_queries(Side((8001,), 'version="v2"'), job="falcon", window_seconds=300)
    served = 'job="falcon",instance=~".+:(8001)",route=~"/infer|/infer/batch|/v2/models/.+/infer"'
    assert queries == {
        "requests": f"sum(increase(falcon_http_requests_total{{{served}}}[300s]))",
        "errors": f'sum(increase(falcon_http_requests_total{{{served},status=~"5.."}}[300s]))',
        "p99": (
            "histogram_quantile(0.99, sum by (le) "
            f"(increase(falcon_http_request_duration_seconds_bucket{{{served}}}[300s])))"
        ),
        "labels": (
            'sum by (label) (increase(falcon_predictions_total{job="falcon",instance=~".+:(8001)",version="v2"}[300s]))'
        ),
    }
    others = side_queries(Side((8002, 8003), 'version!="v2"'), job="web", window_seconds=12)
    assert 'job="web",instance=~".+:(8002|8003)"' in others["requests"] and "[12s]" in others["p99"]
    assert 'version!="v2"' in others["labels"]


def test_observe_reads_the_results_and_treats_empty_as_zero() -> None:
    asked: list[tuple[str, float]] = []
    answers = {
        "requests": [{"metric": {}, "value": [1.0, "412.5"]}],
        "errors": [],  # no 5xx series at all
        "p99": [{"metric": {}, "value": [1.0, "NaN"]}],
        "labels": [
            {"metric": {"label": "negative"}, "value": [1.0, "100"]},
            {"metric": {"label": "positive"}, "value": [1.0, "300"]},
            {"metric": {"label": "neutral"}, "value": [1.0, "0"]},
        ],
    }
    queries = side_queries(Side((8001,), 'version="v2"'), job="falcon", window_seconds=60)
    by_expr = {queries[name]: answer for name, answer in answers.items()}

    def query(expr: str, at: float) -> list[dict[str, Any]]:
        asked.append((expr, at))
        return by_expr[expr]

    seen = observe(query, Side((8001,), 'version="v2"'), job="falcon", window_seconds=60, at=1234.5)
    assert seen == Observation(412.5, 0.0, None, {"negative": 100.0, "positive": 300.0})
    assert {at for _, at in asked} == {1234.5} and len(asked) == 4


def test_evidence_table_lines_up_every_check() -> None:
    verdict = decide(replace(GOOD, label_counts={"negative": 990.0, "positive": 10.0}), GOOD, LIMITS)
    lines = evidence_table(verdict).splitlines()
    assert lines[0].split() == ["metric", "canary", "others", "limit", "verdict"]
    assert [line.split("  ")[0] for line in lines[1:]] == [
        "inference requests",
        "5xx error ratio",
        "p99 latency",
        "predicted-label mix",
    ]
    cells = ["canary", "1000", "0.0020", "5.0 ms", "neg 0.99"]
    columns = {line.index(word) for line, word in zip(lines, cells, strict=True)}
    assert len(columns) == 1, f"the canary column is not aligned:\n{evidence_table(verdict)}"
    assert lines[-1].endswith("FAIL") and "neg 0.30 neu 0.20 pos 0.50" in lines[-1] and "(is 0.690)" in lines[-1]
    assert all(line.endswith("ok") for line in lines[1:-1])


# --- The sequence, with a fake store and fake units ---------------------------------


class FakeStore:
    """The store's pointers in memory, with the calls recorded in order."""

    def __init__(self, active: str, versions: list[str]) -> None:
        self._active: str | None = active
        self._versions = versions
        self.pins: dict[int, str] = {}
        self.calls: list[str] = []

    def versions(self) -> list[str]:
        return self._versions

    def active(self) -> str | None:
        return self._active

    def activate(self, version: str, *, reason: str = "", forced: bool = False) -> str | None:
        self.calls.append(f"activate {version} forced={forced}")
        old, self._active = self._active, version
        return old

    def pin(self, port: int, version: str, *, reason: str = "") -> None:
        self.calls.append(f"pin {port} {version}")
        self.pins[port] = version

    def unpin(self, port: int, *, reason: str = "") -> None:
        self.calls.append(f"unpin {port}")
        self.pins.pop(port, None)


class FakeUnits:
    """Units that serve what the store says once reloaded; a clock that moves when slept."""

    def __init__(self, store: FakeStore, ports: list[int]) -> None:
        self.store = store
        self.now = 1000.0
        self.serves = dict.fromkeys(ports, store.active())
        self.lines: list[str] = []

    def reload(self, port: int) -> None:
        self.store.calls.append(f"reload {port}")
        self.serves[port] = self.store.pins.get(port, self.store.active())

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def hooks(self, query: canary.QueryFunction) -> Hooks:
        return Hooks(
            reload=self.reload,
            serving=self.serves.get,
            query=query,
            sleep=self.sleep,
            clock=lambda: self.now,
            say=self.lines.append,
            ready_timeout_seconds=30,
        )


def prometheus_with(canary_side: Observation, others: Observation) -> canary.QueryFunction:
    """A fake Prometheus answering side_queries() with the given observations."""

    def query(expr: str, at: float) -> list[dict[str, Any]]:
        side = canary_side if ":(8001)" in expr else others
        if expr.startswith("sum by (label)"):
            return [{"metric": {"label": k}, "value": [at, str(v)]} for k, v in side.label_counts.items()]
        value = side.p99_seconds if "histogram_quantile" in expr else side.errors if "5.." in expr else side.requests
        return [{"metric": {}, "value": [at, str(value)]}]

    return query


PLAN = Plan("v2", 8001, (8002, 8003), window_seconds=60)


def test_a_passing_canary_is_activated_and_rolled_on_to_every_unit_the_canary_last() -> None:
    store = FakeStore("v1", ["v1", "v2"])
    units = FakeUnits(store, [8001, 8002, 8003])
    outcome = run_canary(store, PLAN, units.hooks(prometheus_with(GOOD, GOOD)))
    assert outcome.promoted and outcome.summary.startswith("PROMOTED v2")
    assert store.calls == [
        "pin 8001 v2",
        "reload 8001",
        "activate v2 forced=False",
        "unpin 8001",
        "reload 8002",
        "reload 8003",
        "reload 8001",
    ]
    assert units.serves == {8001: "v2", 8002: "v2", 8003: "v2"} and store.active() == "v2"


def test_a_failing_canary_is_unpinned_and_serves_the_active_version_again() -> None:
    store = FakeStore("v1", ["v1", "v2"])
    units = FakeUnits(store, [8001, 8002, 8003])
    collapsed = replace(GOOD, label_counts={"negative": 1000.0})
    outcome = run_canary(store, PLAN, units.hooks(prometheus_with(collapsed, GOOD)))
    assert not outcome.promoted and "label mix shifted" in outcome.summary
    assert store.calls == ["pin 8001 v2", "reload 8001", "unpin 8001", "reload 8001"]
    assert units.serves == {8001: "v1", 8002: "v1", 8003: "v1"} and store.active() == "v1" and store.pins == {}


def test_the_window_is_waited_and_queried_from_when_the_canary_served() -> None:
    store = FakeStore("v1", ["v1", "v2"])
    units = FakeUnits(store, [8001, 8002, 8003])
    asked: list[tuple[str, float]] = []
    answer = prometheus_with(GOOD, GOOD)

    def query(expr: str, at: float) -> list[dict[str, Any]]:
        asked.append((expr, at))
        return answer(expr, at)

    started = units.now
    run_canary(store, PLAN, units.hooks(query))
    # Each wait_until_serving polls SERVING_CONFIRMATIONS times, sleeping between polls.
    polls = (canary.SERVING_CONFIRMATIONS - 1) * canary.SERVING_POLL_SECONDS
    times = {at for _, at in asked}
    assert len(times) == 1 and times.pop() == pytest.approx(started + polls + 60)
    assert all("[60s]" in expr for expr, _ in asked)


def test_an_error_while_watching_rolls_the_canary_back_before_it_propagates() -> None:
    store = FakeStore("v1", ["v1", "v2"])
    units = FakeUnits(store, [8001, 8002, 8003])

    def broken(expr: str, at: float) -> list[dict[str, Any]]:
        raise CanaryError("Prometheus refused it")

    with pytest.raises(CanaryError, match="Prometheus refused"):
        run_canary(store, PLAN, units.hooks(broken))
    assert store.calls[-2:] == ["unpin 8001", "reload 8001"] and units.serves[8001] == "v1"


def test_a_unit_that_never_serves_the_version_times_out_and_is_rolled_back() -> None:
    store = FakeStore("v1", ["v1", "v2"])
    units = FakeUnits(store, [8001, 8002, 8003])
    hooks = units.hooks(prometheus_with(GOOD, GOOD))
    stuck = {8001: "v1"}
    hooks.reload = lambda port: store.calls.append(f"reload {port}")  # the worker never picks up the pin
    hooks.serving = stuck.get
    with pytest.raises(CanaryError, match=r"falcon-worker@8001 serves v1, not v2, after 30 s"):
        run_canary(store, PLAN, hooks)
    assert "activate" not in " ".join(store.calls) and store.pins == {}


def test_serving_must_be_seen_several_times_in_a_row() -> None:
    seen = iter(["v2", "v1", "v2", "v2", "v2", "v2", "v2"])
    polls: list[int] = []
    hooks = Hooks(serving=lambda port: polls.append(port) or next(seen), sleep=lambda s: None, clock=lambda: 0.0)
    canary.wait_until_serving(8001, "v2", hooks)
    assert len(polls) == 2 + canary.SERVING_CONFIRMATIONS, "a draining old worker's answer restarts the count"


def test_the_active_version_needs_no_canary() -> None:
    store = FakeStore("v2", ["v1", "v2"])
    outcome = run_canary(store, PLAN, FakeUnits(store, [8001]).hooks(prometheus_with(GOOD, GOOD)))
    assert outcome.promoted and "already the active version" in outcome.summary and store.calls == []


# --- The command line ------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    canary.add_canary_command(parser.add_subparsers(dest="action"))
    return parser.parse_args(["canary", *argv])


def test_options_become_the_plan_with_the_issue_defaults() -> None:
    plan = canary.plan_from_args(parse("v2", "--ports", "8001,8002,8003", "--canary-port", "8002"))
    assert plan == Plan("v2", 8002, (8001, 8003), 300, Limits(), "falcon", forced=False, reason="")
    tuned = canary.plan_from_args(
        parse("v2", "--ports", "8001,8002", "--window", "12", "--p99-slack-ms", "5", "--min-requests", "20")
    )
    assert tuned.window_seconds == 12 and tuned.limits.p99_slack_seconds == 0.005 and tuned.limits.min_requests == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ports", "8001,8002", "--canary-port", "8003"], "--canary-port 8003 is not one of --ports 8001,8002"),
        (["--ports", "8001"], "a canary needs at least two units"),
        (["--ports", "8001,8002", "--force"], "--force needs --reason"),
    ],
)
def test_a_plan_that_cannot_work_is_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        canary.plan_from_args(parse("v2", *argv))


@pytest.mark.parametrize("ports", ["8001,x", "8001,8001", "0,8001", ""])
def test_bad_ports_are_a_usage_error(ports: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("v2", "--ports", ports)
    assert exit_info.value.code == 2 and "--ports" in capsys.readouterr().err


def run_cli(store: Path, *argv: str) -> int:
    return main(["models", "--store", str(store), "--env-file", str(store / "absent.env"), "canary", *argv])


def test_a_version_not_in_the_store_is_a_setup_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tmp_path, "v9", "--ports", "8001,8002") == canary.EXIT_USAGE
    assert "has no version 'v9'" in capsys.readouterr().err


def test_a_store_without_an_active_version_is_a_setup_error(
    tmp_path: Path, dummy_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = ModelStore(tmp_path).import_artifact(dummy_model_dir)
    assert run_cli(tmp_path, version, "--ports", "8001,8002") == canary.EXIT_USAGE
    assert "no active version to compare with" in capsys.readouterr().err
    assert ModelStore(tmp_path).pins() == {}, "nothing may change on a setup error"


def test_force_without_a_reason_is_a_setup_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tmp_path, "v2", "--ports", "8001,8002", "--force") == canary.EXIT_USAGE
    assert "--force needs --reason" in capsys.readouterr().err
