"""Measure a model: accuracy, macro-F1, per-class F1, confusion, calibration, and the VADER baseline beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import train_test_split

from falcon_svc.model.vader import VADER_THRESHOLD
from falcon_svc.training.data import LABELS

# Equal-width bins of top-class probability for the calibration error and the reliability plot.
CALIBRATION_BINS = 10


def score_predictions(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Return accuracy, macro-F1 and per-class F1 of ``predicted`` against ``truth``."""
    per_class = f1_score(truth, predicted, labels=list(LABELS), average=None, zero_division=0)
    return {
        "n": len(truth),
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "macro_f1": round(float(f1_score(truth, predicted, labels=list(LABELS), average="macro", zero_division=0)), 4),
        "f1_per_class": {label: round(float(value), 4) for label, value in zip(LABELS, per_class, strict=True)},
    }


def confusion(truth: Sequence[str], predicted: Sequence[str]) -> list[list[int]]:
    """Return the confusion matrix in LABELS order: rows are the truth, columns the prediction."""
    matrix = confusion_matrix(list(truth), list(predicted), labels=list(LABELS))
    return [[int(count) for count in row] for row in matrix]


def calibration(
    confidences: Sequence[float], correct: Sequence[bool], *, bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """Return the expected calibration error and the reliability bins of top-class probabilities.

    Bins are equal-width over [0, 1]: bin i holds confidences in [i/bins, (i+1)/bins),
    the last also 1.0. ECE is the count-weighted mean of |accuracy - mean confidence|
    over the bins, so 0 means "70 % sure" is right 70 % of the time. Empty bins are
    listed (count 0, confidence and accuracy None) so every report has the same shape.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    counts = [0] * bins
    confidence_sums = [0.0] * bins
    hits = [0] * bins
    for confidence, right in zip(confidences, correct, strict=True):
        index = min(int(confidence * bins), bins - 1)
        counts[index] += 1
        confidence_sums[index] += confidence
        hits[index] += bool(right)
    total = len(confidences)
    table = []
    gap = 0.0
    for index in range(bins):
        count = counts[index]
        mean_confidence = confidence_sums[index] / count if count else None
        accuracy = hits[index] / count if count else None
        if count:
            gap += count / total * abs(hits[index] / count - confidence_sums[index] / count)
        table.append(
            {
                "lower": round(index / bins, 4),
                "upper": round((index + 1) / bins, 4),
                "count": count,
                "confidence": None if mean_confidence is None else round(mean_confidence, 4),
                "accuracy": None if accuracy is None else round(accuracy, 4),
            }
        )
    return {"ece": round(gap, 4) if total else None, "bins": table}


def label_share(predicted: Sequence[str]) -> dict[str, float]:
    """Return each label's share of ``predicted`` (LABELS order, 4 places); all 0.0 for no predictions."""
    total = len(predicted)
    return {label: round(list(predicted).count(label) / total, 4) if total else 0.0 for label in LABELS}


def held_out_split(
    texts: Sequence[str], labels: Sequence[str], *, test_size: float, seed: int
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Return (train texts, test texts, train labels, test labels): stratified by label, seeded.

    The split training.train_model fits and reports on; tests/ops/test_model_quality.py
    rebuilds it to score a trained artifact itself rather than trust its metadata.
    """
    train_texts, test_texts, train_labels, test_labels = train_test_split(
        texts, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return list(train_texts), list(test_texts), list(train_labels), list(test_labels)


def vader_predict(texts: Sequence[str]) -> list[str] | None:
    """Label ``texts`` with VADER (compound >= VADER_THRESHOLD positive, <= -VADER_THRESHOLD negative).

    Return None if vaderSentiment is not installed: the baseline is a yardstick
    for training, never a dependency of serving.
    """
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        return None
    analyzer = SentimentIntensityAnalyzer()
    labels = []
    for text in texts:
        compound = analyzer.polarity_scores(text)["compound"]
        if compound >= VADER_THRESHOLD:
            labels.append("positive")
        elif compound <= -VADER_THRESHOLD:
            labels.append("negative")
        else:
            labels.append("neutral")
    return labels


def evaluate(predicted: Sequence[str], truth: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
    """Return {"model": scores, "vader": scores or None} for one evaluation set."""
    vader = vader_predict(texts)
    return {
        "model": score_predictions(truth, predicted),
        "vader": score_predictions(truth, vader) if vader is not None else None,
    }


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """Render the metrics of each evaluation set as a plain-text table, model vs VADER."""
    header = f"{'set':<14}{'n':>6}  {'who':<6}{'acc':>7}{'macroF1':>9}{'F1 neg':>8}{'F1 neu':>8}{'F1 pos':>8}"
    lines = [header, "-" * len(header)]
    for set_name, result in metrics.items():
        if not isinstance(result, dict) or "model" not in result:
            continue
        for who in ("model", "vader"):
            scores = result.get(who)
            if not scores:
                continue
            per_class = scores["f1_per_class"]
            lines.append(
                f"{set_name if who == 'model' else '':<14}"
                f"{scores['n'] if who == 'model' else '':>6}  {who:<6}"
                f"{scores['accuracy']:>7.3f}{scores['macro_f1']:>9.3f}"
                + "".join(f"{per_class[label]:>8.3f}" for label in LABELS)
            )
    return "\n".join(lines)
