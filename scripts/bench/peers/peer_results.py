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

``--json OUT`` also writes those numbers as JSON (``summary``): the medians and each
round of every series, and the ratios; scripts/bench/plots/plot.py draws from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def summary(runs: Sequence[Run]) -> dict[str, Any]:
    """Return the numbers of `render` as JSON-ready data: each series' medians and rounds, the ratios."""
    series = []
    for texts in TEXT_KINDS:
        for server in SERVERS:
            each = sorted((run for run in runs if run.server == server and run.texts == texts), key=lambda r: r.round)
            if each:
                series.append(
                    {
                        "server": server,
                        "texts": texts,
                        "rps": statistics.median(run.rps for run in each),
                        "p50_ms": statistics.median(run.p50_ms for run in each),
                        "p99_ms": statistics.median(run.p99_ms for run in each),
                        "failures": sum(run.failures for run in each),
                        "rounds": [run.round for run in each],
                        "rps_each": [run.rps for run in each],
                        "p99_each": [run.p99_ms for run in each],
                    }
                )
    ratios = {}
    for texts in TEXT_KINDS:
        each_ratio = round_ratios(runs, texts)
        if each_ratio:
            ratios[texts] = {"median": statistics.median(each_ratio), "rounds": each_ratio, "target": TARGETS[texts]}
    return {"series": series, "ratios": ratios}


def render(runs: Sequence[Run]) -> str:
    """Return the table (medians over rounds, then each round's rps) and the median ratios."""
    numbers = summary(runs)
    lines = [f"{'server':11} {'texts':9} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}  rps per round"]
    for row in numbers["series"]:
        each = " ".join(f"{rps:.0f}" for rps in row["rps_each"])
        lines.append(
            f"{row['server']:11} {row['texts']:9} {row['rps']:9.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
            f"{row['failures']:7d}  {each}"
        )
    lines.append("")
    for texts, ratio in numbers["ratios"].items():
        each = ", ".join(f"{value:.2f}" for value in ratio["rounds"])
        lines.append(
            f"{texts} texts: falcon-svc / MLServer = {ratio['median']:.2f}x (median of rounds: {each}; "
            f"issue 13 target >= {ratio['target']:g}x)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_file", type=Path, help="ROUND, SERVER, TEXTS and wrk's JSON line, tab-separated")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers to OUT as JSON")
    args = parser.parse_args(argv)
    runs = [parse_line(line) for line in args.results_file.read_text().splitlines() if line.strip()]
    print(render(runs))
    if args.json is not None:
        args.json.write_text(json.dumps(summary(runs), indent=2) + "\n")
    failed = [run for run in runs if run.failures]
    for run in failed:
        print(f"round {run.round} {run.server} {run.texts}: {run.failures} failed requests", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
