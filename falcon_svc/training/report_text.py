"""The evaluation report as text: what ``falcon-svc models show`` and training print."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from falcon_svc.training.data import LABELS

FAILURES_SHOWN_PER_CAPABILITY = 2


def render_report(report: Mapping[str, Any], compare_to: Mapping[str, Any] | None = None) -> str:
    """Return the report as text (what ``falcon-svc models show`` prints), with deltas against ``compare_to``.

    A delta in parentheses is this version minus the compared (active) version, given
    only where both reports have the number.
    """
    lines = [*_header(report)]
    if compare_to is not None:
        lines.append(f"(+0.012): this version minus the active version {compare_to['version']}")
    lines += ["", *_sets_table(report, compare_to), "", *_confusion_lines(report)]
    lines += ["", *_calibration_lines(report), *_latency_lines(report, compare_to)]
    lines += ["", *_behaviour_lines(report, compare_to), "", _plots_line(report.get("plots"))]
    return "\n".join(lines) + "\n"


def _header(report: Mapping[str, Any]) -> list[str]:
    lines = [
        f"model {report.get('name', '?')} {report['version']} (kind {report.get('kind', '?')})",
        f"trained at {report.get('trained_at', '?')}",
    ]
    data = report.get("training_data") or {}
    if data:
        counts = ", ".join(f"{label} {count}" for label, count in (data.get("label_counts") or {}).items())
        split = f"; {data['train_rows']} trained on, {data['test_rows']} held out" if "train_rows" in data else ""
        lines.append(f"data: {data.get('source', '?')}: {data.get('rows', '?')} rows ({counts}){split}")
        plain = data.get("plain_sentences")
        if plain:
            lines.append(f"      plus {plain['rows']} plain sentences from {plain['source']}")
    mix = report.get("label_mix")
    if mix:
        shares = ", ".join(f"{label} {share:.1%}" for label, share in mix.items())
        lines.append(f"predicted label mix on {report.get('main_set')}: {shares}")
    return lines


def _delta(value: float | None, other: float | None, spec: str = "+.3f") -> str:
    return "" if value is None or other is None else f" ({value - other:{spec}})"


def _sets_table(report: Mapping[str, Any], compare_to: Mapping[str, Any] | None) -> list[str]:
    width = 18 if compare_to is not None else 10
    header = (
        f"{'set':<14}{'n':>6}  {'accuracy':<{width}}{'macro-F1':<{width}}"
        f"{'F1 neg':>7}{'F1 neu':>7}{'F1 pos':>7}  {'ECE':<{width}}{'VADER acc':>9}"
    )
    lines = [header, "-" * len(header)]
    other_sets = (compare_to or {}).get("sets", {})
    for name, section in _main_set_first(report):
        other = other_sets.get(name, {})
        ece = section["calibration"]["ece"]
        other_ece = (other.get("calibration") or {}).get("ece")
        per_class = section["f1_per_class"]
        vader = section.get("vader")
        cells = [
            f"{section['accuracy']:.3f}{_delta(section['accuracy'], other.get('accuracy'))}",
            f"{section['macro_f1']:.3f}{_delta(section['macro_f1'], other.get('macro_f1'))}",
        ]
        ece_cell = "n/a" if ece is None else f"{ece:.3f}{_delta(ece, other_ece)}"
        lines.append(
            f"{name:<14}{section['n']:>6}  {cells[0]:<{width}}{cells[1]:<{width}}"
            + "".join(f"{per_class[label]:>7.3f}" for label in LABELS)
            + f"  {ece_cell:<{width}}{'' if not vader else format(vader['accuracy'], '.3f'):>9}"
        )
        if compare_to is not None and not other:
            lines.append(f"{'':<14}(no {name} in the report of {compare_to['version']})")
    return lines


def _main_set_first(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The sets in the report's order (report.json sorts them by name), the main set first."""
    sets = report["sets"]
    main = report.get("main_set")
    return [(name, sets[name]) for name in sorted(sets, key=lambda name: name != main)]


def _confusion_lines(report: Mapping[str, Any]) -> list[str]:
    name = report["main_set"]
    section = report["sets"].get(name)
    if section is None:
        return [f"confusion matrix: no set {name}"]
    labels = section["labels"]
    lines = [f"confusion matrix of {name} (rows: truth, columns: predicted):"]
    lines.append(" " * 12 + "".join(f"{label:>10}" for label in labels))
    for label, row in zip(labels, section["confusion_matrix"], strict=True):
        lines.append(f"  {label:<10}" + "".join(f"{count:>10}" for count in row))
    return lines


def _calibration_lines(report: Mapping[str, Any]) -> list[str]:
    name = report["main_set"]
    section = report["sets"].get(name)
    if section is None:
        return []
    calibration_ = section["calibration"]
    bins = [
        f"{bin_['lower']:.1f}-{bin_['upper']:.1f}: n={bin_['count']:<5} "
        f"mean confidence {bin_['confidence']:.2f}, accuracy {bin_['accuracy']:.2f}"
        for bin_ in calibration_["bins"]
        if bin_["count"]
    ]
    ece = calibration_["ece"]
    lines = [
        f"calibration of {name}: ECE {'n/a' if ece is None else format(ece, '.3f')} (10 bins of top-class probability)"
    ]
    return lines + [f"  {bin_}" for bin_ in bins]


def _latency_lines(report: Mapping[str, Any], compare_to: Mapping[str, Any] | None) -> list[str]:
    latency = report.get("latency")
    if not latency:
        return ["inference time: not measured"]
    other = (compare_to or {}).get("latency") or {}
    versus = f" vs active {compare_to['version']}" if compare_to is not None and other else ""
    p99_delta = _delta(latency["p99_us"], other.get("p99_us"), "+.1f")
    return [
        f"inference time per text ({latency['scorer']} scorer, {latency['calls']} single-text calls over "
        f"{latency['distinct_texts']} texts after {latency['warmup_calls']} warm-up calls): "
        f"p50 {latency['p50_us']:.1f} us{_delta(latency['p50_us'], other.get('p50_us'), '+.1f')}, "
        f"p99 {latency['p99_us']:.1f} us{p99_delta}{versus}"
    ]


def _behaviour_lines(report: Mapping[str, Any], compare_to: Mapping[str, Any] | None) -> list[str]:
    suite = report.get("behaviour")
    if not suite:
        return ["behavioural suite: not run"]
    other = ((compare_to or {}).get("behaviour") or {}).get("capabilities", {})
    overall = _delta(suite["pass_rate"], ((compare_to or {}).get("behaviour") or {}).get("pass_rate"))
    lines = [f"behavioural suite: {suite['pass_rate']:.1%} passed{overall}"]
    for name, result in suite["capabilities"].items():
        delta = _delta(result["pass_rate"], (other.get(name) or {}).get("pass_rate"))
        lines.append(f"  {name:<16}{result['passed']:>3}/{result['n']:<3} {result['pass_rate']:>6.1%}{delta}")
    failures = [(name, failure) for name, result in suite["capabilities"].items() for failure in result["failures"]]
    if failures:
        lines.append("  failing (a few):")
    for name, result in suite["capabilities"].items():
        for failure in result["failures"][:FAILURES_SHOWN_PER_CAPABILITY]:
            lines.append(f"    {name}: {failure['text']!r} expected {failure['expected']}, got {failure['predicted']}")
        hidden = len(result["failures"]) - FAILURES_SHOWN_PER_CAPABILITY
        if hidden > 0:
            lines.append(f"    {name}: ... and {hidden} more")
    return lines


def _plots_line(plots: Any) -> str:
    if isinstance(plots, Mapping):
        return "plots: " + ", ".join(plots.values())
    return f"plots: {plots or 'none'}"


def format_report_summary(report: Mapping[str, Any], path: Path) -> str:
    """Two lines for the end of training: where the report is, calibration and inference time."""
    name = report["main_set"]
    ece = report["sets"][name]["calibration"]["ece"]
    latency = report["latency"]
    plots = report.get("plots")
    return (
        f"evaluation report: {path} (plots: {', '.join(plots.values()) if isinstance(plots, Mapping) else plots})\n"
        f"{name}: ECE {'n/a' if ece is None else format(ece, '.3f')}; inference per text "
        f"p50 {latency['p50_us']:.1f} us, p99 {latency['p99_us']:.1f} us ({latency['scorer']} scorer)"
    )
