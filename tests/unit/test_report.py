"""The evaluation report written beside each trained artifact, label_mix, and its text rendering."""

from __future__ import annotations

import copy
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_train_own_data import labelled_rows, write_csv

from falcon_svc.model import load_model
from falcon_svc.model.artifact import read_metadata
from falcon_svc.training import train_cli, training
from falcon_svc.training.data import LABELS, DataUnavailableError, load_labelled_csv
from falcon_svc.training.evaluation import calibration, confusion, held_out_split, label_share
from falcon_svc.training.report import REPORT_FILE, ReportError, load_report, measure_latency, percentile
from falcon_svc.training.report_plots import CONFUSION_PNG, PLOTS_SKIPPED, RELIABILITY_PNG
from falcon_svc.training.report_text import render_report
from falcon_svc.training.training import TrainingConfig, train_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_ROWS = [
    ("The parcel was wonderful.", "positive"),
    ("It was awful.", "negative"),
    ("The shop is on Main Street.", "neutral"),
    ("The room was terrible and dirty.", "negative"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train one small model on a CSV (about a second) with an extra --eval set."""
    root = tmp_path_factory.mktemp("report")
    data = write_csv(root / "mine.csv", labelled_rows())
    extra = write_csv(root / "extra.csv", EVAL_ROWS)
    output = train_model(root / "model", data=data, eval_sets={"extra": extra}, progress=lambda _message: None)
    return {
        "dir": output,
        "data": data,
        "metadata": read_metadata(output),
        "report": json.loads((output / REPORT_FILE).read_text("utf-8")),
    }


def test_the_report_has_every_metric_set_with_counts_that_add_up(trained: dict[str, Any]) -> None:
    metadata, report = trained["metadata"], trained["report"]
    assert report["version"] == metadata["version"] and report["trained_at"] == metadata["trained_at"]
    assert report["training_data"] == metadata["training_data"]
    assert set(report["sets"]) == set(metadata["metrics"]) == {"held_out", "dev_set", "extra"}
    assert report["main_set"] == "held_out"
    for name, section in report["sets"].items():
        scores = metadata["metrics"][name]["model"]
        assert {key: section[key] for key in ("n", "accuracy", "macro_f1", "f1_per_class")} == {
            key: scores[key] for key in ("n", "accuracy", "macro_f1", "f1_per_class")
        }, name
        matrix = section["confusion_matrix"]
        assert section["labels"] == list(LABELS)
        assert sum(map(sum, matrix)) == section["n"], f"{name}: the confusion matrix does not count every text"
        diagonal = sum(matrix[index][index] for index in range(len(LABELS)))
        assert diagonal / section["n"] == pytest.approx(section["accuracy"], abs=0.00005), name
        bins = section["calibration"]["bins"]
        assert len(bins) == 10 and sum(bin_["count"] for bin_ in bins) == section["n"], name
        assert 0 <= section["calibration"]["ece"] <= 1, name
    extra = report["sets"]["extra"]
    truth_counts = Counter(label for _text, label in EVAL_ROWS)
    assert [sum(row) for row in extra["confusion_matrix"]] == [truth_counts[label] for label in LABELS], (
        "rows are the true labels"
    )
    assert report["behaviour"] == metadata["behaviour"]


def test_the_latency_is_measured_on_the_served_scorer(trained: dict[str, Any]) -> None:
    latency = trained["report"]["latency"]
    assert latency["scorer"] == "compiled", "timed on the fast path, as served"
    assert latency["calls"] == 200 and latency["warmup_calls"] > 0
    assert 0 < latency["p50_us"] <= latency["p99_us"], latency


def test_label_mix_is_signed_metadata_and_matches_the_models_predictions(trained: dict[str, Any]) -> None:
    metadata = trained["metadata"]
    mix = metadata["label_mix"]
    assert metadata["label_mix_set"] == "held_out" and list(mix) == list(LABELS)
    assert sum(mix.values()) == pytest.approx(1, abs=0.001)
    # Rebuild the held-out split as training does and let the loaded artifact answer.
    corpus = load_labelled_csv(trained["data"])
    config = TrainingConfig()
    _, test_texts, _, _ = held_out_split(corpus.texts, corpus.labels, test_size=config.test_size, seed=config.seed)
    predicted = [prediction.label for prediction in load_model(trained["dir"]).predict(test_texts)]
    assert mix == {label: round(predicted.count(label) / len(predicted), 4) for label in LABELS}
    assert trained["report"]["label_mix"] == mix


def test_the_plots_are_pngs(trained: dict[str, Any]) -> None:
    # NOTE: no skip: the dev venv installs matplotlib (requirements-plots.lock); without it
    # this fails on the "skipped" note, as a missing tool must.
    assert trained["report"]["plots"] == {"confusion_matrix": CONFUSION_PNG, "reliability": RELIABILITY_PNG}
    for name in (CONFUSION_PNG, RELIABILITY_PNG):
        assert (trained["dir"] / name).read_bytes()[:8] == PNG_MAGIC, f"{name} is not a PNG"


def test_without_matplotlib_the_report_is_written_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained: dict[str, Any]
) -> None:
    output = tmp_path / "model"
    output.mkdir()
    (output / CONFUSION_PNG).write_bytes(PNG_MAGIC)  # a plot left by an earlier model
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    train_model(output, data=trained["data"], dev_set=None, progress=lambda _message: None)
    report = load_report(output)
    assert report is not None and report["plots"] == PLOTS_SKIPPED
    assert "requirements-plots.txt" in report["plots"]
    assert not (output / CONFUSION_PNG).exists(), "a stale plot would describe another model"
    assert report["sets"]["held_out"]["n"] == report["latency"]["distinct_texts"]


def test_load_report_absent_corrupt_or_of_another_version(tmp_path: Path, trained: dict[str, Any]) -> None:
    assert load_report(tmp_path) is None
    (tmp_path / REPORT_FILE).write_text("{not json", "utf-8")
    with pytest.raises(ReportError, match="corrupt"):
        load_report(tmp_path)
    (tmp_path / REPORT_FILE).write_text("[]", "utf-8")
    with pytest.raises(ReportError, match="not a report"):
        load_report(tmp_path)
    for name in ("metadata.json", "model.joblib"):
        (tmp_path / name).write_bytes((trained["dir"] / name).read_bytes())
    stale = {**trained["report"], "version": "2026.01.01-00000000"}
    (tmp_path / REPORT_FILE).write_text(json.dumps(stale), "utf-8")
    with pytest.raises(ReportError, match=re.escape("of version 2026.01.01-00000000")):
        load_report(tmp_path)
    assert load_report(trained["dir"]) == trained["report"]


def test_calibration_error_of_a_known_example() -> None:
    # bin 0.9-1.0: 2 texts, mean confidence 0.95, 1 right -> |0.5 - 0.95| weighted 2/4
    # bin 0.6-0.7: 1 text at 0.65, right -> |1 - 0.65| weighted 1/4
    # bin 0.3-0.4: 1 text at 0.35, wrong -> |0 - 0.35| weighted 1/4
    result = calibration([0.95, 0.95, 0.65, 0.35], [True, False, True, False])
    assert result["ece"] == pytest.approx(0.45 * 2 / 4 + 0.35 / 4 + 0.35 / 4, abs=0.0001)
    filled = {bin_["lower"]: bin_ for bin_ in result["bins"] if bin_["count"]}
    assert filled == {
        0.3: {"lower": 0.3, "upper": 0.4, "count": 1, "confidence": 0.35, "accuracy": 0.0},
        0.6: {"lower": 0.6, "upper": 0.7, "count": 1, "confidence": 0.65, "accuracy": 1.0},
        0.9: {"lower": 0.9, "upper": 1.0, "count": 2, "confidence": 0.95, "accuracy": 0.5},
    }
    assert calibration([1.0], [True])["bins"][9]["count"] == 1, "a certain answer falls in the last bin"
    assert calibration([], [])["ece"] is None


def test_confusion_rows_are_truth_and_label_share_is_of_predictions() -> None:
    truth = ["negative", "negative", "neutral", "positive"]
    predicted = ["negative", "positive", "neutral", "neutral"]
    assert confusion(truth, predicted) == [[1, 0, 1], [0, 1, 0], [0, 1, 0]]
    assert label_share(predicted) == {"negative": 0.25, "neutral": 0.5, "positive": 0.25}


class FakeModel:
    scorer = "fake"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def predict(self, texts: list[str]) -> list[object]:
        self.calls.append(texts)
        return []


def test_latency_percentiles_of_known_timings() -> None:
    # Call k (1-based) takes k microseconds: p50 is the 50th, p99 the 99th of 100.
    ticks = iter([tick for call in range(1, 101) for tick in (0, call * 1000)])
    model = FakeModel()
    latency = measure_latency(model, ["a", "b", "c"], calls=100, warmup=5, clock=lambda: next(ticks))  # type: ignore[arg-type]
    assert (latency["p50_us"], latency["p99_us"], latency["mean_us"]) == (50.0, 99.0, 50.5)
    assert len(model.calls) == 105 and all(len(call) == 1 for call in model.calls), "one text per call"
    assert latency["distinct_texts"] == 3 and latency["scorer"] == "fake"
    assert percentile([3.0, 1.0, 2.0], 0.99) == 3.0 and percentile([5.0], 0.5) == 5.0


def test_render_report_shows_the_numbers(trained: dict[str, Any]) -> None:
    report = trained["report"]
    text = render_report(report)
    held_out = report["sets"]["held_out"]
    assert report["version"] in text and report["trained_at"] in text
    for name, section in report["sets"].items():
        assert f"{section['accuracy']:.3f}" in text and f"{section['macro_f1']:.3f}" in text, name
        assert f"{section['calibration']['ece']:.3f}" in text, name
    matrix_rows = [
        f"  {label:<10}" + "".join(f"{n:>10}" for n in row)
        for label, row in zip(LABELS, held_out["confusion_matrix"], strict=True)
    ]
    assert all(row in text for row in matrix_rows), text
    assert f"p50 {report['latency']['p50_us']:.1f} us" in text and f"p99 {report['latency']['p99_us']:.1f} us" in text
    for name, result in report["behaviour"]["capabilities"].items():
        assert f"{result['passed']:>3}/{result['n']:<3}" in text and name in text
    assert CONFUSION_PNG in text and RELIABILITY_PNG in text
    assert "vs active" not in text and "(+" not in text, "no deltas without a version to compare with"


def test_render_report_compares_with_the_active_version(trained: dict[str, Any]) -> None:
    report = trained["report"]
    active = copy.deepcopy(report)
    active["version"] = "2026.12.01-abcd1234"
    active["sets"]["held_out"]["accuracy"] = round(report["sets"]["held_out"]["accuracy"] - 0.125, 4)
    active["sets"]["held_out"]["macro_f1"] = round(report["sets"]["held_out"]["macro_f1"] + 0.25, 4)
    active["sets"]["held_out"]["calibration"]["ece"] = round(report["sets"]["held_out"]["calibration"]["ece"] - 0.01, 4)
    active["latency"]["p99_us"] = report["latency"]["p99_us"] + 7.5
    del active["sets"]["extra"]
    text = render_report(report, compare_to=active)
    assert "active version 2026.12.01-abcd1234" in text
    held_out_line = next(line for line in text.splitlines() if line.startswith("held_out"))
    assert "(+0.125)" in held_out_line and "(-0.250)" in held_out_line and "(+0.010)" in held_out_line, held_out_line
    assert "(-7.5) vs active 2026.12.01-abcd1234" in text
    assert "no extra in the report of 2026.12.01-abcd1234" in text


def test_an_atomic_training_publishes_the_report_with_the_artifact(tmp_path: Path, trained: dict[str, Any]) -> None:
    output = tmp_path / "model"
    args = ["--data", str(trained["data"]), "--output-dir", str(output), "--atomic"]
    assert train_cli.main(args) == 0
    report = load_report(output)
    assert report is not None and report["version"] == read_metadata(output)["version"]


def test_a_dummy_model_drops_the_report_of_the_trained_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained: dict[str, Any]
) -> None:
    output = tmp_path / "model"
    output.mkdir()
    for name in (REPORT_FILE, CONFUSION_PNG):
        (output / name).write_bytes((trained["dir"] / name).read_bytes())

    def no_corpus(*_args: object, **_kwargs: object) -> None:
        raise DataUnavailableError("no corpus here")

    monkeypatch.setattr(train_cli, "train_model", no_corpus)
    assert train_cli.main(["--output-dir", str(output)]) == 0
    assert read_metadata(output)["kind"] == "dummy"
    assert load_report(output) is None and not (output / CONFUSION_PNG).exists(), "the dummy has no report"


def test_a_failed_report_leaves_no_stale_one_beside_the_new_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained: dict[str, Any]
) -> None:
    output = tmp_path / "model"
    output.mkdir()
    (output / REPORT_FILE).write_bytes((trained["dir"] / REPORT_FILE).read_bytes())

    def broken_report(*_args: object) -> None:
        raise RuntimeError("the report failed")

    monkeypatch.setattr(training, "write_evaluation_report", broken_report)
    with pytest.raises(RuntimeError, match="the report failed"):
        train_model(output, data=trained["data"], dev_set=None, progress=lambda _message: None)
    assert read_metadata(output)["version"], "the artifact was written"
    assert not (output / REPORT_FILE).exists(), "the old artifact's report would describe the new one"
