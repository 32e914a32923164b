"""Classify normalised texts: the one service call behind every inference route.

Resources parse and shape; this module runs the model and records what it did.
The next layer (cache) slots in here, so every route gets it at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from falcon_svc import metrics
from falcon_svc.model import Model, Prediction


@dataclass(frozen=True, slots=True)
class Result:
    """One text's prediction and where it came from."""

    prediction: Prediction
    cache_hit: bool

    def to_body(self, model_version: str) -> dict[str, Any]:
        """Shape this result as the JSON object the API returns per text."""
        prediction = self.prediction
        return {
            "label": prediction.label,
            "confidence": prediction.confidence,
            "probabilities": prediction.probabilities,
            "model_version": model_version,
            "cache_hit": self.cache_hit,
        }


class Classifier:
    """Run the model on normalised texts and record inference metrics."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._latency = metrics.INFERENCE_LATENCY.labels(model.scorer)
        self._per_label = {label: metrics.PREDICTIONS.labels(label) for label in model.labels}

    def classify(self, texts: Sequence[str]) -> list[Result]:
        """Return one result per text, in order, from one vectorised model call."""
        started = time.perf_counter()
        predictions = self.model.predict(texts)
        self._latency.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(texts))
        for prediction in predictions:
            self._per_label[prediction.label].inc()
        return [Result(prediction, cache_hit=False) for prediction in predictions]
