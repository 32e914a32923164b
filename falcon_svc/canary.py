"""``falcon-svc models canary VERSION``: serve a version on one unit, compare it, then roll on or back.

The canary unit (falcon-worker@P) is pinned to VERSION in the model store and reloaded
(gunicorn's graceful HUP: no request fails); the other units keep the active version.
After a window, Prometheus compares the canary against the others on what a bad model
shows first: its 5xx share, its p99 latency on the inference routes, and the mix of the
labels it predicts (a model that collapsed onto one label answers 200 quickly, and only
the mix betrays it). Every check must pass on enough traffic, else the canary is rolled
back: "no evidence" is no reason to roll a model out.

Failure semantics: once the canary unit is pinned, any error (Prometheus unreachable, a
unit that does not come back with the version, an interrupt) unpins and reloads it
before the command exits, so a failed canary never leaves a unit on the new version.
Exit codes: 0 promoted (or already active), 1 rolled back or not rolled out, 2 usage or
setup error (nothing changed). The store logs pin, unpin and activate in history.jsonl.

Everything that touches the outside world (systemctl, the units' HTTP, Prometheus, the
clock) is passed in as ``Hooks``, so tests drive real servers with their own reload.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from falcon_svc.rollout import RolloutError, served_version, systemctl_reload, wait_serving

EXIT_PROMOTED = 0
EXIT_ROLLED_BACK = 1
EXIT_USAGE = 2

# Routes that run the model: the canary is judged on these only. Probes and scrapes are
# answered the same whatever the model (and a draining worker's /readyz 503 is by design).
# NOTE: ".+/infer" also matches /v2/models/{name}/versions/{version}/infer.
INFERENCE_ROUTES = "/infer|/infer/batch|/v2/models/.+/infer"
# Polls in a row that must agree a unit serves a version: during a HUP reload the old
# worker still answers on the shared socket until it has drained.
SERVING_CONFIRMATIONS = 5
SERVING_POLL_SECONDS = 0.2
# Limits are inclusive; this keeps a value that equals its limit on paper (a TVD of
# 0.15 computed as 0.15000000000000002) from failing by a rounding error.
ROUNDING_SLACK = 1e-9


# --- Decision ------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How far the canary may be from the others and still be promoted (defaults: the issue's)."""

    # Absolute: the canary's 5xx share may exceed the others' by one point.
    max_error_increase: float = 0.01
    # The canary's p99 may be 1.5x the others' plus a slack: at low load p99s of 2 and
    # 4 ms are noise (one slow request), not a slower model.
    max_p99_ratio: float = 1.5
    p99_slack_seconds: float = 0.025
    # Total variation distance between the label shares (0 same mix, 1 disjoint).
    max_label_shift: float = 0.15
    # Inference requests each side must have answered in the window.
    min_requests: int = 100


@dataclass(frozen=True)
class Observation:
    """What one side (the canary unit, or the other units together) did in the window."""

    requests: float
    errors: float
    p99_seconds: float | None
    label_counts: Mapping[str, float] = field(default_factory=dict)

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None


@dataclass(frozen=True)
class Check:
    """One row of the evidence: a metric on both sides, its limit and whether it passed."""

    metric: str
    canary: str
    others: str
    limit: str
    passed: bool
    reason: str = ""  # why it failed, for the decision line

    @property
    def verdict(self) -> str:
        return "ok" if self.passed else "FAIL"


@dataclass(frozen=True)
class Verdict:
    """The decision and the evidence it rests on."""

    checks: tuple[Check, ...]

    @property
    def promote(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [check.reason for check in self.checks if not check.passed]


def label_shares(counts: Mapping[str, float]) -> dict[str, float]:
    """Return each label's share of the predictions (empty when there were none)."""
    total = sum(counts.values())
    return {label: count / total for label, count in counts.items()} if total > 0 else {}


def label_shift(canary: Mapping[str, float], others: Mapping[str, float]) -> float:
    """Return the total variation distance between two label-share distributions (0 to 1)."""
    labels = set(canary) | set(others)
    return 0.5 * sum(abs(canary.get(label, 0.0) - others.get(label, 0.0)) for label in labels)


def decide(canary: Observation, others: Observation, limits: Limits) -> Verdict:
    """Judge the canary against the others: every check must pass, on enough traffic."""
    return Verdict(
        (
            _traffic_check(canary, others, limits),
            _error_check(canary, others, limits),
            _latency_check(canary, others, limits),
            _label_check(canary, others, limits),
        )
    )


def _traffic_check(canary: Observation, others: Observation, limits: Limits) -> Check:
    # Both sides: the others' numbers are the baseline each comparison leans on.
    short = [
        f"{side} answered {observation.requests:.0f} inference requests (< {limits.min_requests})"
        for side, observation in (("the canary", canary), ("the others", others))
        if observation.requests < limits.min_requests
    ]
    reason = "not enough traffic to judge: " + "; ".join(short) if short else ""
    return Check(
        "inference requests",
        f"{canary.requests:.0f}",
        f"{others.requests:.0f}",
        f">= {limits.min_requests} each",
        not short,
        reason,
    )


def _error_check(canary: Observation, others: Observation, limits: Limits) -> Check:
    canary_ratio, others_ratio = canary.error_ratio, others.error_ratio
    if canary_ratio is None or others_ratio is None:
        return Check("5xx error ratio", _ratio(canary_ratio), _ratio(others_ratio), "-", False, "no error ratio")
    allowed = others_ratio + limits.max_error_increase
    passed = canary_ratio <= allowed + ROUNDING_SLACK
    increase = limits.max_error_increase
    reason = "" if passed else f"5xx ratio {canary_ratio:.4f} > others' {others_ratio:.4f} + {increase}"
    return Check("5xx error ratio", _ratio(canary_ratio), _ratio(others_ratio), f"<= {allowed:.4f}", passed, reason)


def _latency_check(canary: Observation, others: Observation, limits: Limits) -> Check:
    canary_p99, others_p99 = canary.p99_seconds, others.p99_seconds
    if canary_p99 is None or others_p99 is None:
        return Check("p99 latency", _ms(canary_p99), _ms(others_p99), "-", False, "no p99 latency (no samples)")
    allowed = others_p99 * limits.max_p99_ratio + limits.p99_slack_seconds
    passed = canary_p99 <= allowed + ROUNDING_SLACK
    reason = "" if passed else f"p99 {_ms(canary_p99)} > {_ms(allowed)} (others' x{limits.max_p99_ratio} + slack)"
    return Check("p99 latency", _ms(canary_p99), _ms(others_p99), f"<= {_ms(allowed)}", passed, reason)


def _label_check(canary: Observation, others: Observation, limits: Limits) -> Check:
    canary_shares, others_shares = label_shares(canary.label_counts), label_shares(others.label_counts)
    limit = f"TVD <= {limits.max_label_shift}"
    if not canary_shares or not others_shares:
        return Check("predicted-label mix", _mix(canary_shares), _mix(others_shares), limit, False, "no predictions")
    shift = label_shift(canary_shares, others_shares)
    passed = shift <= limits.max_label_shift + ROUNDING_SLACK
    reason = "" if passed else f"label mix shifted: TVD {shift:.3f} > {limits.max_label_shift}"
    return Check(
        "predicted-label mix", _mix(canary_shares), _mix(others_shares), f"{limit} (is {shift:.3f})", passed, reason
    )


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _mix(shares: Mapping[str, float]) -> str:
    return " ".join(f"{label[:3]} {share:.2f}" for label, share in sorted(shares.items())) or "none"


def evidence_table(verdict: Verdict) -> str:
    """Return the evidence as an aligned text table: metric, canary, others, limit, verdict."""
    rows = [("metric", "canary", "others", "limit", "verdict")]
    rows += [(c.metric, c.canary, c.others, c.limit, c.verdict) for c in verdict.checks]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


# --- Prometheus ------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """Which series make one side: the units' ports and a matcher on the predictions' version."""

    ports: tuple[int, ...]
    version_matcher: str  # e.g. 'version="v2"' for the canary, 'version!="v2"' for the others


def instance_matcher(ports: Sequence[int]) -> str:
    """Match the scrape targets of these units by port (the host part differs per inventory)."""
    return f'instance=~".+:({"|".join(str(port) for port in ports)})"'


def side_queries(side: Side, *, job: str, window_seconds: int) -> dict[str, str]:
    """Return the PromQL for one side: requests, 5xx, p99 and predictions by label over the window."""
    where = f'job="{job}",{instance_matcher(side.ports)}'
    served = f'{where},route=~"{INFERENCE_ROUTES}"'
    window = f"[{window_seconds}s]"
    return {
        "requests": f"sum(increase(falcon_http_requests_total{{{served}}}{window}))",
        "errors": f'sum(increase(falcon_http_requests_total{{{served},status=~"5.."}}{window}))',
        "p99": (
            "histogram_quantile(0.99, sum by (le) "
            f"(increase(falcon_http_request_duration_seconds_bucket{{{served}}}{window})))"
        ),
        "labels": f"sum by (label) (increase(falcon_predictions_total{{{where},{side.version_matcher}}}{window}))",
    }


# (PromQL, evaluation time) -> the instant query's result list.
QueryFunction = Callable[[str, float], list[dict[str, Any]]]


def prometheus_query(base_url: str, timeout: float = 10.0) -> QueryFunction:
    """Return a function running instant queries against Prometheus's HTTP API."""

    def query(expr: str, at: float) -> list[dict[str, Any]]:
        params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        url = f"{base_url.rstrip('/')}/api/v1/query?{params}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as ex:
            try:
                body = json.loads(ex.read() or b"{}")
            except ValueError:
                body = {"errorType": f"HTTP {ex.code}", "error": "(not a Prometheus API answer)"}
        except ValueError as ex:
            raise CanaryError(f"Prometheus at {base_url} did not answer JSON: {ex}") from ex
        if body.get("status") != "success":
            raise CanaryError(f"Prometheus refused {expr!r}: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    return query


def _scalar(result: list[dict[str, Any]]) -> float | None:
    """Return the single value of an aggregated result; None when empty or NaN."""
    if not result:
        return None
    value = float(result[0]["value"][1])
    return value if math.isfinite(value) else None


def observe(query: QueryFunction, side: Side, *, job: str, window_seconds: int, at: float) -> Observation:
    """Measure one side over the window ending at ``at``."""
    queries = side_queries(side, job=job, window_seconds=window_seconds)
    labels = {series["metric"].get("label", ""): float(series["value"][1]) for series in query(queries["labels"], at)}
    return Observation(
        requests=_scalar(query(queries["requests"], at)) or 0.0,
        # sum() of nothing is an empty result: no 5xx series yet means no 5xx.
        errors=_scalar(query(queries["errors"], at)) or 0.0,
        p99_seconds=_scalar(query(queries["p99"], at)),
        label_counts={label: count for label, count in labels.items() if math.isfinite(count) and count > 0},
    )


# --- The units -------------------------------------------------------------------


class CanaryStore(Protocol):
    """What the canary needs of the model store (falcon_svc/model/store.py)."""

    def versions(self) -> list[str]: ...
    def active(self) -> str | None: ...
    def activate(self, version: str, *, reason: str = "", forced: bool = False) -> str | None: ...
    def pin(self, port: int, version: str, *, reason: str = "") -> None: ...
    def unpin(self, port: int, *, reason: str = "") -> None: ...


@dataclass
class Hooks:
    """The outside world, injectable: tests reload with SIGHUP and shorten the waits."""

    reload: Callable[[int], None] = systemctl_reload
    serving: Callable[[int], str | None] = served_version
    query: QueryFunction | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
    say: Callable[[str], None] = print
    ready_timeout_seconds: float = 120.0


@dataclass(frozen=True)
class Plan:
    """One canary run: what to try, where, for how long, and how strict."""

    version: str
    canary_port: int
    other_ports: tuple[int, ...]
    window_seconds: int
    limits: Limits = Limits()
    job: str = "falcon"
    forced: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Outcome:
    promoted: bool
    verdict: Verdict | None
    summary: str


class CanaryError(RuntimeError):
    """The canary could not be run or finished (a unit did not come back, Prometheus failed)."""


def wait_until_serving(port: int, version: str, hooks: Hooks) -> None:
    """Poll the unit until it serves ``version`` several times in a row; CanaryError after the timeout."""
    try:
        wait_serving(
            port,
            version,
            within=hooks.ready_timeout_seconds,
            poll=SERVING_POLL_SECONDS,
            confirmations=SERVING_CONFIRMATIONS,
            serving=hooks.serving,
            clock=hooks.clock,
            sleep=hooks.sleep,
        )
    except RolloutError as ex:
        raise CanaryError(str(ex)) from ex


def reload_and_wait(port: int, version: str, hooks: Hooks) -> None:
    hooks.say(f"canary: reloading falcon-worker@{port}, waiting for it to serve {version}")
    hooks.reload(port)
    wait_until_serving(port, version, hooks)


def run_canary(store: CanaryStore, plan: Plan, hooks: Hooks) -> Outcome:
    """Pin, watch, decide, then promote or roll back; the canary unit is never left pinned."""
    active = store.active()
    if active == plan.version:
        return Outcome(True, None, f"{plan.version} is already the active version: nothing to do")
    if active is None:
        raise CanaryError("the store has no active version to compare with: activate one first")
    note = f"canary on port {plan.canary_port}" + (f": {plan.reason}" if plan.reason else "")
    store.pin(plan.canary_port, plan.version, reason=note)
    hooks.say(f"canary: pinned port {plan.canary_port} to {plan.version} (active: {active})")
    try:
        reload_and_wait(plan.canary_port, plan.version, hooks)
        verdict = watch(plan, hooks)
    except BaseException as ex:
        # NOTE: BaseException: an interrupt must not leave the canary unit on the new version.
        hooks.say(f"canary: {type(ex).__name__}: {ex}; rolling back")
        roll_back(store, plan, active, hooks)
        raise
    if verdict.promote:
        promote(store, plan, hooks)
        return Outcome(True, verdict, f"PROMOTED {plan.version}: every check passed (previous: {active})")
    roll_back(store, plan, active, hooks)
    return Outcome(False, verdict, f"ROLLED BACK {plan.version}: " + "; ".join(verdict.reasons))


def watch(plan: Plan, hooks: Hooks) -> Verdict:
    """Wait the window, then compare the canary with the others over exactly that window."""
    if hooks.query is None:
        raise CanaryError("no Prometheus to query")
    started = hooks.clock()
    hooks.say(f"canary: watching for {plan.window_seconds} s")
    hooks.sleep(plan.window_seconds)
    ended = hooks.clock()
    # The range starts when the canary was seen serving: its reload is not in the window.
    seconds = max(1, round(ended - started))
    canary = Side((plan.canary_port,), f'version="{plan.version}"')
    others = Side(plan.other_ports, f'version!="{plan.version}"')
    return decide(
        observe(hooks.query, canary, job=plan.job, window_seconds=seconds, at=ended),
        observe(hooks.query, others, job=plan.job, window_seconds=seconds, at=ended),
        plan.limits,
    )


class PromotionError(CanaryError):
    """The version passed and is active, but a unit did not come back serving it."""


def promote(store: CanaryStore, plan: Plan, hooks: Hooks) -> None:
    """Activate the version, then move the other units to it, the canary last (it serves it already)."""
    reason = f"canary passed on port {plan.canary_port}" + (f": {plan.reason}" if plan.reason else "")
    store.activate(plan.version, reason=reason, forced=plan.forced)
    store.unpin(plan.canary_port, reason="canary promoted")
    hooks.say(f"canary: activated {plan.version}")
    for port in (*plan.other_ports, plan.canary_port):
        try:
            reload_and_wait(port, plan.version, hooks)
        except (CanaryError, RolloutError, OSError) as ex:
            raise PromotionError(
                f"{plan.version} passed and is active, but falcon-worker@{port} did not come back serving it: "
                f"{ex} (falcon-svc models rollback --reload to go back)"
            ) from ex


def roll_back(store: CanaryStore, plan: Plan, active: str, hooks: Hooks) -> None:
    """Unpin the canary unit and reload it until it serves the active version again."""
    store.unpin(plan.canary_port, reason=f"canary of {plan.version} rolled back")
    hooks.say(f"canary: unpinned port {plan.canary_port}")
    reload_and_wait(plan.canary_port, active, hooks)


# --- Command line ------------------------------------------------------------------


def add_canary_command(actions: Any) -> None:
    """Add ``canary`` to the ``falcon-svc models`` subcommands (``--store`` and ``--env-file`` are theirs)."""
    from falcon_svc.store_commands import add_gate_arguments, port_list

    limits = Limits()
    parser = actions.add_parser(
        "canary",
        help="serve VERSION on one unit, compare it with the others via Prometheus, then promote or roll back",
    )
    parser.add_argument("version", metavar="VERSION")
    parser.add_argument("--ports", required=True, type=port_list, help="the host's worker ports, e.g. 8001,8002")
    parser.add_argument("--canary-port", type=int, help="the unit that tries VERSION first (default: the first port)")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL (%(default)s)")
    parser.add_argument("--job", default="falcon", help="the Prometheus job of the units (%(default)s)")
    parser.add_argument("--window", type=_positive_int, default=300, help="seconds to watch (%(default)s)")
    parser.add_argument(
        "--max-error-increase",
        type=float,
        default=limits.max_error_increase,
        help="the canary's 5xx ratio may exceed the others' by this much, absolute (%(default)s)",
    )
    parser.add_argument(
        "--max-p99-ratio", type=float, default=limits.max_p99_ratio, help="p99 limit: others' x this (%(default)s)"
    )
    parser.add_argument(
        "--p99-slack-ms",
        type=float,
        default=limits.p99_slack_seconds * 1000,
        help="... plus this many ms, so low-load noise does not fail it (%(default)s)",
    )
    parser.add_argument(
        "--max-label-shift",
        type=float,
        default=limits.max_label_shift,
        help="largest total variation distance between the label shares (%(default)s)",
    )
    parser.add_argument(
        "--min-requests",
        type=int,
        default=limits.min_requests,
        help="inference requests each side must answer in the window, else roll back (%(default)s)",
    )
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds for a unit to serve a version")
    # NOTE: SUPPRESS, so a `models --store DIR canary ...` is not reset to None by this parser.
    parser.add_argument("--store", type=Path, default=argparse.SUPPRESS, help="the model store (default MODEL_STORE)")
    add_gate_arguments(parser)
    parser.set_defaults(handler=canary_command)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def plan_from_args(args: argparse.Namespace, *, forced: bool = False) -> Plan:
    """Build the plan (``forced``: the gate refused and --force overrode it); ValueError names a bad option."""
    ports: tuple[int, ...] = args.ports
    canary_port = args.canary_port if args.canary_port is not None else ports[0]
    if canary_port not in ports:
        raise ValueError(f"--canary-port {canary_port} is not one of --ports {_port_list(ports)}")
    if len(ports) < 2:
        raise ValueError("a canary needs at least two units (--ports): one to try, the others to compare with")
    if args.force and not args.reason.strip():
        raise ValueError("--force needs --reason: the store's history records why the gate was overridden")
    limits = Limits(
        max_error_increase=args.max_error_increase,
        max_p99_ratio=args.max_p99_ratio,
        p99_slack_seconds=args.p99_slack_ms / 1000,
        max_label_shift=args.max_label_shift,
        min_requests=args.min_requests,
    )
    others = tuple(port for port in ports if port != canary_port)
    return Plan(args.version, canary_port, others, args.window, limits, args.job, forced=forced, reason=args.reason)


def canary_command(args: argparse.Namespace) -> int:
    """Gate, run the canary, print the evidence; exit 0 promoted, 1 rolled back or refused, 2 setup error."""
    from falcon_svc.model.artifact import ModelLoadError
    from falcon_svc.model.signing import PublicKeyError
    from falcon_svc.model.store import StoreError
    from falcon_svc.store_commands import CommandError, command_settings, gate_sets, open_store, run_gate

    try:
        plan = plan_from_args(args)
        settings = command_settings(args)
        store = open_store(args, settings)
        store.version_dir(plan.version)  # StoreError naming the stored versions
        if store.active() is None:
            raise ValueError("the store has no active version to compare with: activate one first")
        if store.active() != plan.version:
            # The same gate as `models activate`, on versions verified as the workers verify them.
            gate = run_gate(store, settings, plan.version, gate_sets(args.gate_set))
            print(gate.table())
            if not gate.passed:
                _refused(plan, gate.reasons, overridden=args.force)
                if not args.force:
                    return EXIT_ROLLED_BACK
                plan = replace(plan, forced=True)
    except (ValueError, CommandError, StoreError, ModelLoadError, PublicKeyError, OSError) as ex:
        print(f"falcon-svc models canary: {ex}", file=sys.stderr)
        return EXIT_USAGE
    hooks = Hooks(query=prometheus_query(args.prometheus), ready_timeout_seconds=args.ready_timeout)
    try:
        outcome = run_canary(store, plan, hooks)
    except PromotionError as ex:
        print(f"falcon-svc models canary: {ex}", file=sys.stderr)
        return EXIT_ROLLED_BACK
    except (CanaryError, RolloutError, StoreError, OSError) as ex:
        print(f"falcon-svc models canary: {ex} (the canary unit was rolled back)", file=sys.stderr)
        return EXIT_ROLLED_BACK
    report(outcome, plan)
    return EXIT_PROMOTED if outcome.promoted else EXIT_ROLLED_BACK


def _refused(plan: Plan, reasons: list[str], *, overridden: bool) -> None:
    for reason in reasons:
        print(f"gate: {reason}")
    if overridden:
        print(f"gate overridden (--force): {plan.reason}")
    else:
        print(f"decision: NOT ROLLED OUT {plan.version}: the gate refused it (override with --force --reason)")


def report(outcome: Outcome, plan: Plan) -> None:
    """Print the evidence table and the decision."""
    if outcome.verdict is not None:
        others = _port_list(plan.other_ports)
        print(f"\ncanary {plan.version} on port {plan.canary_port} vs {others}, {plan.window_seconds} s window")
        print(evidence_table(outcome.verdict))
    print(f"decision: {outcome.summary}")


def _port_list(ports: Sequence[int]) -> str:
    return ",".join(str(port) for port in ports)
