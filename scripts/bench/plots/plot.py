"""Render the performance plots of docs/perf/ (PNG) from results directories.

    plot.py --out DIR [--load LOAD_DIR] [--workers WORKERS_DIR] [--peers PEERS_DIR]

- ``--load``: a sweep_load.sh directory -> latency_vs_load.png: p50/p95/p99 against
  the offered rate, with the rate achieved, and the knee (the first rate that broke
  the k6 baseline's thresholds) marked.
- ``--workers``: a sweep_workers.sh directory -> throughput_per_workers.png: requests/s
  (median of rounds, each round a dot) and p50/p99 per worker-process count.
- ``--peers``: a bench_peers.sh RESULTS_DIR -> falcon_vs_mlserver.png: rps and p99 of
  falcon-svc and MLServer on unique texts (cache misses) and one repeated text (hits),
  with the median ratio of the paired rounds.

Each plot carries the machine (cores, CPU, host) and the date of its measurement
(meta.json) and the settings that produced it. Every figure is FIGURE_SIZE at DPI,
so a regenerated PNG drops into the docs at the same size. matplotlib comes from
requirements-plots.lock (`make plots` installs it); the Agg canvas, so no display.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from plot_data import (
    LoadPoint,
    WorkerSummary,
    knee,
    read_load_sweep,
    read_meta,
    read_peers,
    read_worker_sweep,
    summarise_workers,
    where_and_when,
)

FIGURE_SIZE = (10.0, 6.0)  # inches
DPI = 100  # so every PNG is 1000 x 600 pixels
LOAD_PNG = "latency_vs_load.png"
WORKERS_PNG = "throughput_per_workers.png"
PEERS_PNG = "falcon_vs_mlserver.png"
# One colour per server and per percentile, the same in every plot.
COLOURS = {"p50": "#1f77b4", "p95": "#ff7f0e", "p99": "#d62728", "rps": "#555555"}
SERVER_COLOURS = {"mlserver": "#8c8c8c", "falcon-svc": "#2ca02c"}
SERVER_NAMES = {"mlserver": "MLServer", "falcon-svc": "falcon-svc"}
PLAIN_NUMBER = FuncFormatter(lambda value, _position: f"{value:g}")
# Over more than a decade, only 2 and 5 (20, 50, 200...) between decades: every minor
# tick labelled is unreadable.
SOME_PLAIN_NUMBERS = FuncFormatter(lambda value, _position: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")
TEXT_NAMES = {"unique": "unique texts\n(cache misses)", "repeated": "one repeated text\n(falcon-svc: cache hits)"}


def new_figure(title: str, meta: Mapping[str, Any], settings: str) -> Figure:
    """Return a figure of the standard size whose title names what, where and when."""
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    figure.suptitle(f"{title}\n{where_and_when(meta)}; {settings}", fontsize=11)
    return figure


def save(figure: Figure, path: Path) -> Path:
    """Write `figure` as a PNG of exactly FIGURE_SIZE x DPI pixels (no tight bounding box)."""
    figure.savefig(path, dpi=DPI, format="png")
    return path


def plot_load(points: Sequence[LoadPoint], meta: Mapping[str, Any], path: Path) -> Path:
    """Draw latency percentiles and achieved rps against the offered rate; mark the knee."""
    settings = meta.get("settings", {})
    figure = new_figure(
        "falcon-svc: latency against offered load (k6 baseline, open model)",
        meta,
        f"{settings.get('duration', '?')} per rate, {settings.get('url', '?')}",
    )
    latency = figure.add_subplot()
    offered = [p.offered_rps for p in points]
    for name, values in (
        ("p50", [p.p50_ms for p in points]),
        ("p95", [p.p95_ms for p in points]),
        ("p99", [p.p99_ms for p in points]),
    ):
        latency.plot(offered, values, "o-", color=COLOURS[name], label=f"{name} latency")
    crossed = [p for p in points if p.past_knee]
    if crossed:
        latency.scatter(
            [p.offered_rps for p in crossed],
            [p.p99_ms for p in crossed],
            marker="x",
            s=120,
            color="black",
            zorder=5,
            label="thresholds crossed",
        )
    first = knee(points)
    if first is not None:
        latency.axvline(first.offered_rps, color="black", linestyle=":", linewidth=1)
        latency.annotate(
            f"knee: thresholds first crossed at {first.offered_rps:g}/s",
            xy=(first.offered_rps, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            ha="left",
            va="bottom",
            fontsize=9,
        )
    latency.set_yscale("log")
    # Plain numbers (0.5, 2, 50), not 2x10^0, on the log axis.
    latency.yaxis.set_major_formatter(PLAIN_NUMBER)
    values = [value for p in points for value in (p.p50_ms, p.p99_ms) if value > 0]
    within_a_decade = bool(values) and max(values) < 10 * min(values)
    latency.yaxis.set_minor_formatter(PLAIN_NUMBER if within_a_decade else SOME_PLAIN_NUMBERS)
    latency.set_xlabel("offered rate (requests/s)")
    latency.set_ylabel("latency (ms, log scale)")
    latency.grid(True, which="both", alpha=0.3)
    achieved = latency.twinx()
    achieved.plot(offered, [p.achieved_rps for p in points], "s--", color=COLOURS["rps"], label="achieved rps")
    achieved.plot(offered, offered, ":", color=COLOURS["rps"], alpha=0.5, label="achieved = offered")
    achieved.set_ylabel("achieved rate (requests/s)")
    achieved.set_ylim(bottom=0)
    _legend(figure, latency, achieved)
    return save(figure, path)


def plot_workers(summaries: Sequence[WorkerSummary], meta: Mapping[str, Any], path: Path) -> Path:
    """Draw requests/s (bars: median; dots: each round) and p50/p99 per worker count."""
    settings = meta.get("settings", {})
    figure = new_figure(
        "falcon-svc: throughput per worker-process count (unique texts)",
        meta,
        f"wrk -t{settings.get('threads', '?')} -c{settings.get('connections', '?')} "
        f"-d{settings.get('duration_s', '?')}s, {settings.get('rounds', '?')} round(s)",
    )
    rps = figure.add_subplot()
    workers = [s.workers for s in summaries]
    bars = rps.bar(
        workers,
        [s.rps for s in summaries],
        width=0.6,
        color=SERVER_COLOURS["falcon-svc"],
        alpha=0.7,
        label="requests/s (median)",
    )
    rps.bar_label(bars, labels=[f"{s.rps:,.0f}/s" for s in summaries], label_type="center", fontsize=9)
    rps.scatter(
        [s.workers for s in summaries for _ in s.rps_each],
        [rps_value for s in summaries for rps_value in s.rps_each],
        color="black",
        s=12,
        zorder=5,
        label="requests/s of each round",
    )
    rps.set_xticks(workers)
    rps.set_xlabel(f"worker processes (WORKERS), on {meta['machine']['nproc']} cores")
    rps.set_ylabel("requests/s (median of rounds)")
    rps.set_ylim(0, max(max(s.rps_each) for s in summaries) * 1.2)
    latency = rps.twinx()
    latency.plot(workers, [s.p50_ms for s in summaries], "o-", color=COLOURS["p50"], label="p50 latency")
    latency.plot(workers, [s.p99_ms for s in summaries], "o-", color=COLOURS["p99"], label="p99 latency")
    latency.set_ylabel("latency (ms)")
    latency.set_ylim(bottom=0)
    _legend(figure, rps, latency)
    return save(figure, path)


def plot_peers(summary: Mapping[str, Any], meta: Mapping[str, Any], path: Path) -> Path:
    """Draw rps and p99 of both servers side by side, misses and hits, with the median ratios."""
    settings = meta.get("settings", {})
    figure = new_figure(
        " ".join(f"falcon-svc against MLServer {settings.get('mlserver', '')} on the same model".split()),
        meta,
        f"wrk -t{settings.get('threads', '?')} -c{settings.get('connections', '?')} "
        f"-d{settings.get('duration_s', '?')}s, {settings.get('rounds', '?')} alternating round(s)",
    )
    rps_axes, p99_axes = figure.subplots(1, 2)
    series = {(row["texts"], row["server"]): row for row in summary["series"]}
    kinds = [texts for texts in TEXT_NAMES if any((texts, server) in series for server in SERVER_NAMES)]
    _grouped_bars(rps_axes, series, kinds, median="rps", each="rps_each", number="{:,.0f}")
    _grouped_bars(p99_axes, series, kinds, median="p99_ms", each="p99_each", number="{:.1f}")
    for index, texts in enumerate(kinds):
        ratio = summary["ratios"].get(texts)
        if ratio:
            rps_axes.annotate(
                f"falcon-svc: {ratio['median']:.1f}x MLServer\n(target {ratio['target']:g}x)",
                xy=(index, 1.0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=9,
            )
    rps_axes.set_ylabel("requests/s (median of rounds)")
    p99_axes.set_ylabel("p99 latency (ms, median of rounds)")
    _legend(figure, rps_axes)
    return save(figure, path)


def _grouped_bars(
    axes: Axes, series: Mapping[tuple[str, str], Any], kinds: Sequence[str], *, median: str, each: str, number: str
) -> None:
    """Draw one bar per server in each group of texts (the median), each round a dot, the value inside."""
    width = 0.38
    dots_x: list[float] = []
    dots_y: list[float] = []
    for offset, server in zip((-width / 2, width / 2), SERVER_NAMES, strict=True):
        rows = [series.get((texts, server)) for texts in kinds]
        positions = [index + offset for index in range(len(kinds))]
        values = [row[median] if row else 0.0 for row in rows]
        bars = axes.bar(positions, values, width, color=SERVER_COLOURS[server], label=SERVER_NAMES[server])
        axes.bar_label(bars, labels=[number.format(v) if v else "" for v in values], label_type="center", fontsize=8)
        for position, row in zip(positions, rows, strict=True):
            if row:
                dots_x += [position] * len(row[each])
                dots_y += row[each]
    axes.scatter(dots_x, dots_y, color="black", s=10, zorder=5, label="each round")
    axes.set_xticks(range(len(kinds)), [TEXT_NAMES[texts] for texts in kinds], fontsize=9)
    axes.grid(True, axis="y", alpha=0.3)
    axes.margins(y=0.15)


def _legend(figure: Figure, *axes: Axes) -> None:
    """Put the lines of axes sharing an x axis into one legend, below them, clear of the data."""
    handles, labels = [], []
    for each in axes:
        more_handles, more_labels = each.get_legend_handles_labels()
        handles += more_handles
        labels += more_labels
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)


def render(out: Path, load: Path | None, workers: Path | None, peers: Path | None) -> list[Path]:
    """Render a PNG for each results directory given, into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if load is not None:
        written.append(plot_load(read_load_sweep(load), read_meta(load), out / LOAD_PNG))
    if workers is not None:
        summaries = summarise_workers(read_worker_sweep(workers))
        written.append(plot_workers(summaries, read_meta(workers), out / WORKERS_PNG))
    if peers is not None:
        written.append(plot_peers(read_peers(peers), read_meta(peers), out / PEERS_PNG))
    return written


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the PNGs go (e.g. docs/perf)")
    parser.add_argument("--load", type=Path, help="a sweep_load.sh results directory")
    parser.add_argument("--workers", type=Path, help="a sweep_workers.sh results directory")
    parser.add_argument("--peers", type=Path, help="a bench_peers.sh RESULTS_DIR")
    args = parser.parse_args(argv)
    if args.load is None and args.workers is None and args.peers is None:
        parser.error("give at least one of --load, --workers, --peers")
    try:
        written = render(args.out, args.load, args.workers, args.peers)
    except ValueError as ex:
        print(f"plot: {ex}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
