"""Read the results directories of the sweeps and of bench-peers into the points the plots draw.

No matplotlib here: parsing is tested, and usable, without it.

- sweep_load.sh: ``runs.tsv`` (``RATE<TAB>EXIT<TAB>FILE``, one line per offered rate)
  and the k6 summary export each line names (``k6 run --summary-export``: metrics by
  name, trend stats such as ``med`` and ``p(99)`` in milliseconds, a threshold's value
  true when it was crossed). Exit 99 is k6's "a threshold was crossed": past the knee.
- sweep_workers.sh: ``workers.tsv`` (``ROUND<TAB>WORKERS<TAB>JSON``), the JSON being
  the line scripts/bench/unique_texts.lua's ``done()`` prints.
- bench_peers.sh with RESULTS_DIR: ``summary.json`` (peer_results.py --json).
- each of them: ``meta.json`` (run_meta.py): the machine and the date, for the titles.

A file that lacks what a plot needs raises ValueError naming the file and the field:
a plot silently drawn from half the data would be worse than none.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# k6's exit status when a threshold was crossed (load_test.sh passes it through).
K6_THRESHOLDS_CROSSED = 99
WRK_KEYS = ("requests", "rps", "p50_ms", "p99_ms", "non2xx", "socket_errors")


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """One k6 baseline run at one offered rate."""

    offered_rps: float
    achieved_rps: float
    requests: int
    failed_share: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # Requests k6 could not send for lack of a free VU: the service fell behind.
    dropped: int
    crossed: tuple[str, ...]
    exit_status: int

    @property
    def past_knee(self) -> bool:
        """Whether this rate broke the baseline's thresholds (latency, failures or dropped requests)."""
        return bool(self.crossed) or self.exit_status == K6_THRESHOLDS_CROSSED


@dataclass(frozen=True, slots=True)
class WorkerPoint:
    """One wrk run against the service started with `workers` worker processes."""

    round: int
    workers: int
    rps: float
    p50_ms: float
    p99_ms: float
    failures: int


@dataclass(frozen=True, slots=True)
class WorkerSummary:
    """The median over rounds of one worker count, and each round's rps."""

    workers: int
    rps: float
    p50_ms: float
    p99_ms: float
    failures: int
    rps_each: tuple[float, ...]


def _metric(metrics: Mapping[str, Any], name: str, field: str, source: str) -> float:
    try:
        return float(metrics[name][field])
    except (KeyError, TypeError, ValueError) as ex:
        raise ValueError(f"{source}: the k6 summary lacks {name}.{field}") from ex


def crossed_thresholds(summary: Mapping[str, Any]) -> tuple[str, ...]:
    """Return ``metric: expression`` for each threshold the run crossed, sorted."""
    return tuple(
        f"{name}: {expression}"
        for name, metric in sorted(summary.get("metrics", {}).items())
        for expression, failed in sorted(metric.get("thresholds", {}).items())
        if failed
    )


def load_point(summary: Mapping[str, Any], offered_rps: float, exit_status: int, source: str = "summary") -> LoadPoint:
    """Return the point of one k6 summary export (``--summary-export``) at an offered rate."""
    metrics = summary.get("metrics")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{source}: not a k6 summary export (no 'metrics')")
    duration = "http_req_duration"
    return LoadPoint(
        offered_rps=float(offered_rps),
        achieved_rps=_metric(metrics, "http_reqs", "rate", source),
        requests=int(_metric(metrics, "http_reqs", "count", source)),
        failed_share=_metric(metrics, "http_req_failed", "value", source),
        p50_ms=_metric(metrics, duration, "med", source),
        p95_ms=_metric(metrics, duration, "p(95)", source),
        p99_ms=_metric(metrics, duration, "p(99)", source),
        # k6 leaves the metric out when nothing was dropped.
        dropped=int(metrics.get("dropped_iterations", {}).get("count", 0)),
        crossed=crossed_thresholds(summary),
        exit_status=exit_status,
    )


def read_load_sweep(directory: Path) -> list[LoadPoint]:
    """Return the points of a sweep_load.sh results directory, by offered rate."""
    index = directory / "runs.tsv"
    points = []
    for number, line in enumerate(_lines(index), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{index}:{number}: expected RATE, EXIT and FILE, tab-separated: {line!r}")
        rate, status, name = fields
        summary_path = directory / name
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as ex:
            raise ValueError(f"{index}:{number}: cannot read the k6 summary {summary_path}: {ex}") from ex
        points.append(load_point(summary, float(rate), int(status), str(summary_path)))
    if not points:
        raise ValueError(f"{index}: no runs")
    return sorted(points, key=lambda point: point.offered_rps)


def knee(points: Iterable[LoadPoint]) -> LoadPoint | None:
    """Return the lowest offered rate that broke the thresholds, or None when every rate held."""
    return next((point for point in sorted(points, key=lambda p: p.offered_rps) if point.past_knee), None)


def parse_wrk_json(line: str, source: str = "wrk") -> dict[str, float]:
    """Return the summary unique_texts.lua prints; raise ValueError when it is not one."""
    try:
        summary = json.loads(line)
    except ValueError as ex:
        raise ValueError(f"{source}: not a JSON wrk summary: {line[:200]!r}") from ex
    missing = [key for key in WRK_KEYS if key not in summary] if isinstance(summary, dict) else list(WRK_KEYS)
    if missing:
        raise ValueError(f"{source}: the wrk summary lacks {', '.join(missing)}: {line[:200]!r}")
    return summary


def read_worker_sweep(directory: Path) -> list[WorkerPoint]:
    """Return the runs of a sweep_workers.sh results directory, in file order."""
    index = directory / "workers.tsv"
    points = []
    for number, line in enumerate(_lines(index), 1):
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise ValueError(f"{index}:{number}: expected ROUND, WORKERS and a wrk summary, tab-separated: {line!r}")
        round_text, workers, text = fields
        summary = parse_wrk_json(text, f"{index}:{number}")
        points.append(
            WorkerPoint(
                round=int(round_text),
                workers=int(workers),
                rps=float(summary["rps"]),
                p50_ms=float(summary["p50_ms"]),
                p99_ms=float(summary["p99_ms"]),
                failures=int(summary["non2xx"]) + int(summary["socket_errors"]),
            )
        )
    if not points:
        raise ValueError(f"{index}: no runs")
    return points


def summarise_workers(points: Sequence[WorkerPoint]) -> list[WorkerSummary]:
    """Return the median over rounds of each worker count, by worker count."""
    summaries = []
    for workers in sorted({point.workers for point in points}):
        runs = sorted((p for p in points if p.workers == workers), key=lambda p: p.round)
        summaries.append(
            WorkerSummary(
                workers=workers,
                rps=statistics.median(p.rps for p in runs),
                p50_ms=statistics.median(p.p50_ms for p in runs),
                p99_ms=statistics.median(p.p99_ms for p in runs),
                failures=sum(p.failures for p in runs),
                rps_each=tuple(p.rps for p in runs),
            )
        )
    return summaries


def read_peers(directory: Path) -> dict[str, Any]:
    """Return bench_peers.sh's summary.json; raise ValueError when it lacks the servers or ratios."""
    path = directory / "summary.json"
    summary = _read_json(path)
    for key in ("series", "ratios"):
        if key not in summary:
            raise ValueError(f"{path}: lacks {key!r} (written by peer_results.py --json?)")
    return summary


def read_meta(directory: Path) -> dict[str, Any]:
    """Return a results directory's meta.json (run_meta.py)."""
    path = directory / "meta.json"
    meta = _read_json(path)
    if "date" not in meta or "nproc" not in meta.get("machine", {}):
        raise ValueError(f"{path}: lacks the date or machine.nproc")
    return meta


def where_and_when(meta: Mapping[str, Any]) -> str:
    """Return the subtitle every plot carries: the machine, its cores and the date (UTC)."""
    machine = meta["machine"]
    date = str(meta["date"]).replace("T", " ").removesuffix("Z")[:16]
    cpu = f" ({machine['cpu']})" if machine.get("cpu") else ""
    host = f"{machine['hostname']}: " if machine.get("hostname") else ""
    return f"{host}{machine['nproc']} cores{cpu}, {date} UTC"


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as ex:
        raise ValueError(f"cannot read {path}: {ex}") from ex
    return [line for line in text.splitlines() if line.strip()]


def _read_json(path: Path) -> Any:
    """Return the JSON in ``path``; raise ValueError naming the file when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as ex:
        raise ValueError(f"cannot read {path}: {ex}") from ex
