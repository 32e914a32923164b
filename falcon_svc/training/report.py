"""The evaluation report of one model version: ``report.json`` and its plots, beside the artifact.

Training writes it after the artifact (it needs the version write_artifact assigns):
per evaluation set the accuracy, macro-F1, per-class F1, confusion matrix and
calibration (expected calibration error and reliability bins), the inference time per
text measured on the model as served (the compiled scorer, one text per call), and the
behavioural suite's pass rates. ``falcon-svc models show VERSION`` prints it with
render_report, beside the active version's.

The report is informational: the signature covers metadata.json and model.joblib only.
Nothing decides on it: the gate scores both versions again (falcon_svc/training/gate.py),
and the drift alert's baseline (label_mix) is in the signed metadata. Plots need matplotlib, which is in the dev venv
(requirements-plots.txt) but not on serving hosts: without it the report says the plots
were skipped and is written all the same.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from falcon_svc.model.artifact import METADATA_FILE, atomic_write, read_metadata
from falcon_svc.model.predictor import Model, model_from_pipeline
from falcon_svc.training.data import LABELS
from falcon_svc.training.evaluation import calibration, confusion
from falcon_svc.training.report_plots import PLOT_FILES, PLOTS_SKIPPED, write_plots

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

REPORT_FILE = "report.json"
REPORT_FORMAT = 1
# ~200 single-text calls give a p99 that is the 2nd slowest call: enough to see a
# regression of the scorer, cheap enough (well under a second) to run on every training.
LATENCY_CALLS = 200
# The first calls pay for lazy imports and cold caches, which a long-lived worker pays once.
LATENCY_WARMUP = 20
# The sets named by training for its own held-out split; the first present is the main set.
MAIN_SET_PREFERENCE = ("held_out", "tweet_test")

Clock = Callable[[], int]


class ReportError(Exception):
    """Raised when a report.json exists but cannot be used (corrupt, or another version's)."""


@dataclass(frozen=True, slots=True)
class SetOutcome:
    """What a model answered on one evaluation set: texts, true labels, probabilities (columns: classes)."""

    texts: Sequence[str]
    truth: Sequence[str]
    probabilities: np.ndarray
    classes: tuple[str, ...]

    @property
    def predicted(self) -> list[str]:
        """The argmax label of each row (what predict() answers for a logistic regression)."""
        return [self.classes[int(index)] for index in np.argmax(self.probabilities, axis=1)]

    @property
    def confidences(self) -> list[float]:
        """The top-class probability of each row."""
        return [float(value) for value in np.max(self.probabilities, axis=1)]


def score_set(pipeline: Pipeline, texts: Sequence[str], truth: Sequence[str]) -> SetOutcome:
    """Score ``texts`` with ``pipeline.predict_proba`` once."""
    probabilities = pipeline.predict_proba(list(texts)) if texts else np.zeros((0, len(pipeline.classes_)))
    return SetOutcome(list(texts), list(truth), probabilities, tuple(str(label) for label in pipeline.classes_))


def main_set_name(names: Sequence[str]) -> str:
    """Return the set a version is summarised by: its held-out split, else the first set."""
    for name in MAIN_SET_PREFERENCE:
        if name in names:
            return name
    if not names:
        raise ValueError("no evaluation set")
    return names[0]


def set_report(scores: Mapping[str, Any], outcome: SetOutcome) -> dict[str, Any]:
    """Return one set's section: the metadata's scores plus confusion matrix and calibration."""
    model = scores["model"]
    vader = scores.get("vader")
    predicted = outcome.predicted
    correct = [got == truth for got, truth in zip(predicted, outcome.truth, strict=True)]
    return {
        "source": scores.get("source"),
        "n": model["n"],
        "accuracy": model["accuracy"],
        "macro_f1": model["macro_f1"],
        "f1_per_class": model["f1_per_class"],
        "vader": None if not vader else {"accuracy": vader["accuracy"], "macro_f1": vader["macro_f1"]},
        "labels": list(LABELS),
        "confusion_matrix": confusion(outcome.truth, predicted),
        "calibration": calibration(outcome.confidences, correct),
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile (an observed value, no interpolation)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def measure_latency(
    model: Model,
    texts: Sequence[str],
    *,
    calls: int = LATENCY_CALLS,
    warmup: int = LATENCY_WARMUP,
    clock: Clock = time.perf_counter_ns,
) -> dict[str, Any]:
    """Time ``calls`` single-text Model.predict calls (texts cycled) after ``warmup`` untimed ones.

    One text per call is what /v1/infer does on a cache miss; texts are already
    normalised (as the service's validation leaves them), so this is the model's
    share of a request, not the HTTP stack's.
    """
    if not texts:
        raise ValueError("no texts to time")
    for index in range(warmup):
        model.predict([texts[index % len(texts)]])
    elapsed_us = []
    for index in range(calls):
        text = texts[index % len(texts)]
        start = clock()
        model.predict([text])
        elapsed_us.append((clock() - start) / 1000)
    return {
        "calls": calls,
        "distinct_texts": min(calls, len(texts)),
        "warmup_calls": warmup,
        "scorer": model.scorer,
        "what": "Model.predict([text]), one normalised text per call, in the training process",
        "p50_us": round(percentile(elapsed_us, 0.50), 1),
        "p99_us": round(percentile(elapsed_us, 0.99), 1),
        "mean_us": round(sum(elapsed_us) / len(elapsed_us), 1),
    }


def build_report(
    metadata: Mapping[str, Any], outcomes: Mapping[str, SetOutcome], latency: Mapping[str, Any]
) -> dict[str, Any]:
    """Assemble report.json's content from the written metadata, the sets' outcomes and the timing."""
    metrics = metadata["metrics"]
    return {
        "report_format": REPORT_FORMAT,
        "name": metadata["name"],
        "version": metadata["version"],
        "kind": metadata["kind"],
        "trained_at": metadata["trained_at"],
        "training_data": metadata.get("training_data"),
        "main_set": metadata.get("label_mix_set") or main_set_name(list(outcomes)),
        "label_mix": metadata.get("label_mix"),
        "sets": {name: set_report(metrics[name], outcome) for name, outcome in outcomes.items()},
        "latency": dict(latency),
        "behaviour": metadata.get("behaviour"),
    }


def write_evaluation_report(output_dir: Path, pipeline: Pipeline, outcomes: Mapping[str, SetOutcome]) -> Path:
    """Time the served model, then write report.json and its plots into the artifact ``output_dir``."""
    metadata = read_metadata(output_dir)
    model = model_from_pipeline(pipeline, metadata)
    main = outcomes[main_set_name(list(outcomes))]
    report = build_report(metadata, outcomes, measure_latency(model, main.texts))
    return write_report(output_dir, report)


def write_report(output_dir: Path, report: dict[str, Any]) -> Path:
    """Write the plots (or note why not) and then report.json, each atomically; return report.json's path."""
    try:
        report["plots"] = write_plots(output_dir, report)
    except ImportError:
        # NOTE: plots left by an earlier training would describe another version.
        for name in PLOT_FILES:
            (output_dir / name).unlink(missing_ok=True)
        report["plots"] = PLOTS_SKIPPED
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    path = output_dir / REPORT_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, "utf-8"))
    return path


def remove_report(output_dir: Path) -> None:
    """Delete a report and plots left by an earlier artifact in ``output_dir`` (they describe other bytes)."""
    for name in (REPORT_FILE, *PLOT_FILES):
        (output_dir / name).unlink(missing_ok=True)


def load_report(artifact_dir: Path) -> dict[str, Any] | None:
    """Return the artifact's report, or None if it has none; raise ReportError if it is unusable.

    A report whose version differs from the metadata.json beside it is refused: it was
    left by another artifact and its numbers would be attributed to this one.
    """
    path = Path(artifact_dir) / REPORT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        report = json.loads(data.decode("utf-8"))
    except ValueError as ex:
        raise ReportError(f"evaluation report {path} is corrupt: {ex}") from ex
    if not isinstance(report, dict) or not isinstance(report.get("sets"), dict) or "version" not in report:
        raise ReportError(f"evaluation report {path} is not a report (no version or sets)")
    if (Path(artifact_dir) / METADATA_FILE).is_file():
        version = read_metadata(artifact_dir)["version"]
        if report["version"] != version:
            raise ReportError(f"evaluation report {path} is of version {report['version']}, the artifact is {version}")
    return report
