"""The activation gate: a candidate version must not score worse than the active one.

Both versions are scored here, now, on the same gate sets (labelled CSVs) and through
the same path as serving (``normalize`` then ``Model.predict``), rather than compared
by the numbers in their metadata: two trainings may have measured different held-out
splits, and a number one can edit is not evidence. The candidate also runs the
behavioural suite (falcon_svc/training/behaviour_cases.csv) and must pass its floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from falcon_svc.model.predictor import Model
from falcon_svc.text import normalize

# The metrics compared per set; a drop beyond the tolerance in either refuses.
GATE_METRICS = ("accuracy", "macro_f1")


@dataclass
class GateResult:
    """The verdict, every reason for a refusal, and the numbers behind it."""

    passed: bool
    reasons: list[str]
    # set name -> {"candidate": {...}, "active": {...}}
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    behaviour: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Return the evidence as aligned text, one line per set and metric."""
        lines = [f"{'set':<14} {'metric':<9} {'candidate':>9} {'active':>9} {'delta':>8}"]
        for name, scores in self.scores.items():
            for metric in GATE_METRICS:
                candidate = scores["candidate"][metric]
                active = scores.get("active", {}).get(metric)
                if active is None:
                    lines.append(f"{name:<14} {metric:<9} {candidate:>9.4f} {'-':>9} {'-':>8}")
                else:
                    lines.append(f"{name:<14} {metric:<9} {candidate:>9.4f} {active:>9.4f} {candidate - active:>+8.4f}")
        if self.behaviour.get("pass_rate") is not None:
            lines.append(f"behavioural suite: {self.behaviour['pass_rate']:.0%} passed")
        return "\n".join(lines)


def default_gate_sets() -> dict[str, Path]:
    """Return the shipped gate sets: the hand-labelled dev sentences (shipped in this package)."""
    return {"dev_set": Path(__file__).with_name("dev_sentences.csv")}


def score(model: Model, texts: list[str], labels: list[str]) -> dict[str, float]:
    """Return accuracy and macro-F1 of ``model`` on a labelled set, as served."""
    from sklearn.metrics import accuracy_score, f1_score

    predicted = [prediction.label for prediction in model.predict([normalize(text) for text in texts])]
    return {
        "n": len(texts),
        "accuracy": round(float(accuracy_score(labels, predicted)), 4),
        "macro_f1": round(float(f1_score(labels, predicted, average="macro", zero_division=0)), 4),
    }


def check_gate(
    candidate: Model,
    active: Model | None,
    *,
    tolerance: float,
    behaviour_floor: float,
    sets: Mapping[str, Path] | None = None,
) -> GateResult:
    """Score ``candidate`` (and ``active``) on the gate sets; refuse a drop beyond ``tolerance``.

    ``tolerance`` and ``behaviour_floor`` are fractions (0.02 = two points of accuracy).
    With no active version only the behavioural floor applies.
    """
    from falcon_svc.training.behaviour import run_suite
    from falcon_svc.training.data import load_sentences

    reasons: list[str] = []
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for name, path in (default_gate_sets() if sets is None else sets).items():
        texts, labels = load_sentences(Path(path))
        scores[name] = {"candidate": score(candidate, texts, labels)}
        if active is None:
            continue
        scores[name]["active"] = score(active, texts, labels)
        for metric in GATE_METRICS:
            # NOTE: rounded like the scores, so a drop of exactly the tolerance passes.
            drop = round(scores[name]["active"][metric] - scores[name]["candidate"][metric], 4)
            if drop > tolerance:
                reasons.append(
                    f"{name}: {metric} {scores[name]['candidate'][metric]:.4f} is {drop:.4f} below the active "
                    f"version's {scores[name]['active'][metric]:.4f} (tolerance {tolerance:.4f})"
                )
    behaviour = run_suite(lambda texts: [p.label for p in candidate.predict([normalize(t) for t in texts])])
    if behaviour["pass_rate"] is not None and behaviour["pass_rate"] < behaviour_floor:
        reasons.append(
            f"behavioural suite: {behaviour['pass_rate']:.0%} passed, below the floor of {behaviour_floor:.0%}"
        )
    return GateResult(not reasons, reasons, scores, behaviour)
