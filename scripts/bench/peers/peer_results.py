"""Summarise the alternating wrk rounds of bench_peers.sh: one table and the median ratios.

Input: one line per wrk run, ``ROUND<TAB>SERVER<TAB>TEXTS<TAB>{summary JSON}``, the
JSON being the line unique_texts.lua's ``done()`` prints. SERVER is ``falcon-svc`` or
``mlserver``, TEXTS ``unique`` (every request a cache miss) or ``repeated`` (one
text: falcon-svc answers from its cache; MLServer has none and recomputes).

The ratio of a round is falcon-svc's rps over MLServer's in that same round: the two
ran back to back on the same texts, so a noisy neighbour slows both. The reported
ratio is the median of those per-round ratios, robust to one disturbed round.

A run with non-2xx replies or socket errors makes the exit status 1: its rps counts
failures, not inferences.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

FALCON = "falcon-svc"
MLSERVER = "mlserver"
SERVERS = (MLSERVER, FALCON)
TEXT_KINDS = ("unique", "repeated")
SUMMARY_KEYS = ("requests", "rps", "p50_ms", "p99_ms", "non2xx", "socket_errors")
# Issue 13's targets for the full path against MLServer, shown beside the ratios.
TARGETS = {"unique": 8.0, "repeated": 12.0}


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run: which round, server and texts, and its summary."""

    round: int
    server: str
    texts: str
    rps: float
    p50_ms: float
    p99_ms: float
    failures: int


def parse_wrk_summary(output: str) -> dict[str, float]:
    """Return the JSON summary line of a wrk run's output; raise ValueError without one."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            missing = [key for key in SUMMARY_KEYS if key not in summary]
            if missing:
                raise ValueError(f"wrk summary lacks {', '.join(missing)}: {line}")
            return summary
    raise ValueError(f"no JSON summary line in the wrk output: {output[-300:]!r}")


def parse_line(line: str) -> Run:
    """Parse one ``ROUND<TAB>SERVER<TAB>TEXTS<TAB>JSON`` line."""
    fields = line.rstrip("\n").split("\t", 3)
    if len(fields) != 4:
        raise ValueError(f"expected ROUND, SERVER, TEXTS and a summary, tab-separated: {line!r}")
    round_text, server, texts, output = fields
    if server not in SERVERS or texts not in TEXT_KINDS:
        raise ValueError(f"unknown server {server!r} or texts {texts!r} in {line!r}")
    summary = parse_wrk_summary(output)
    return Run(
        round=int(round_text),
        server=server,
        texts=texts,
        rps=float(summary["rps"]),
        p50_ms=float(summary["p50_ms"]),
        p99_ms=float(summary["p99_ms"]),
        failures=int(summary["non2xx"]) + int(summary["socket_errors"]),
    )


def round_ratios(runs: Iterable[Run], texts: str) -> list[float]:
    """Return falcon-svc rps / MLServer rps for each round that has both, in round order."""
    rps: dict[tuple[int, str], float] = {}
    for run in runs:
        if run.texts == texts:
            rps[(run.round, run.server)] = run.rps
    rounds = sorted({number for number, _ in rps})
    return [
        rps[(number, FALCON)] / rps[(number, MLSERVER)]
        for number in rounds
        if (number, FALCON) in rps and rps.get((number, MLSERVER), 0) > 0
    ]


def median_or_none(values: Sequence[float]) -> float | None:
    """Return the median of ``values``, or None for none."""
    return statistics.median(values) if values else None


def render(runs: Sequence[Run]) -> str:
    """Return the table (medians over rounds, then each round's rps) and the median ratios."""
    lines = [f"{'server':11} {'texts':9} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}  rps per round"]
    for texts in TEXT_KINDS:
        for server in SERVERS:
            series = [run for run in runs if run.server == server and run.texts == texts]
            if not series:
                continue
            rps = statistics.median(run.rps for run in series)
            p50 = statistics.median(run.p50_ms for run in series)
            p99 = statistics.median(run.p99_ms for run in series)
            failed = sum(run.failures for run in series)
            each = " ".join(f"{run.rps:.0f}" for run in sorted(series, key=lambda run: run.round))
            lines.append(f"{server:11} {texts:9} {rps:9.1f} {p50:8.2f} {p99:8.2f} {failed:7d}  {each}")
    lines.append("")
    for texts in TEXT_KINDS:
        ratios = round_ratios(runs, texts)
        ratio = median_or_none(ratios)
        if ratio is None:
            continue
        each = ", ".join(f"{value:.2f}" for value in ratios)
        lines.append(
            f"{texts} texts: falcon-svc / MLServer = {ratio:.2f}x (median of rounds: {each}; "
            f"issue 13 target >= {TARGETS[texts]:g}x)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: peer_results.py RESULTS_FILE", file=sys.stderr)
        return 2
    runs = [parse_line(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    print(render(runs))
    failed = [run for run in runs if run.failures]
    for run in failed:
        print(f"round {run.round} {run.server} {run.texts}: {run.failures} failed requests", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
