"""A behavioural suite in the spirit of CheckList: does the model handle what sentiment hinges on?

Accuracy on a held-out split says how often the model is right on texts like its
training data; it does not say which kinds of sentence it gets wrong. These cases,
written for this project (behaviour_cases.csv: capability, text, expected label), each
test one capability: negation ("not good"), intensifiers ("extremely"), contrast (the
clause after "but" decides), emoji, typos, and neutral statements of fact. Training
runs the suite and writes the pass rate of each capability, and the failing texts,
into the artifact's metadata (``behaviour``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from falcon_svc.training.data import LABELS

CASES_FILE = Path(__file__).with_name("behaviour_cases.csv")


def load_cases(path: Path = CASES_FILE) -> list[tuple[str, str, str]]:
    """Return (capability, text, expected label) rows; raise ValueError on a bad label."""
    with path.open(encoding="utf-8", newline="") as handle:
        cases = [(row["capability"], row["text"], row["label"]) for row in csv.DictReader(handle)]
    bad = [case for case in cases if case[2] not in LABELS]
    if bad:
        raise ValueError(f"{path}: unknown labels in {bad}")
    return cases


def run_suite(
    predict: Callable[[list[str]], Sequence[str]], cases: Sequence[tuple[str, str, str]] | None = None
) -> dict[str, Any]:
    """Predict every case in one call; return the pass rate per capability and overall, with the failures."""
    cases = load_cases() if cases is None else cases
    predicted = list(predict([text for _capability, text, _label in cases]))
    capabilities: dict[str, dict[str, Any]] = {}
    for (capability, text, expected), got in zip(cases, predicted, strict=True):
        result = capabilities.setdefault(capability, {"n": 0, "passed": 0, "failures": []})
        result["n"] += 1
        if got == expected:
            result["passed"] += 1
        else:
            result["failures"].append({"text": text, "expected": expected, "predicted": got})
    for result in capabilities.values():
        result["pass_rate"] = round(result["passed"] / result["n"], 4)
    passed = sum(result["passed"] for result in capabilities.values())
    return {"pass_rate": round(passed / len(cases), 4) if cases else None, "capabilities": capabilities}


def format_suite(suite: dict[str, Any]) -> str:
    """One line: the overall pass rate and each capability's passed/total."""
    parts = [f"{name} {result['passed']}/{result['n']}" for name, result in suite["capabilities"].items()]
    return f"behavioural suite: {suite['pass_rate']:.0%} passed ({', '.join(parts)})"
