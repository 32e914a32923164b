"""Classify normalised texts: the one service call behind every inference route.

Resources parse and shape; this module consults the cache, runs the model on
what the cache did not have, and records what it did. Every route (v1, batch,
OIP v2) goes through ``Classifier.classify``, so all get the cache at once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from falcon_svc import metrics
from falcon_svc.cache import ResponseCache
from falcon_svc.model import Model, Prediction


def text_digest(text: str) -> str:
    """Return the sha256 hex digest of a normalised text: the cache key's and the log's."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Result:
    """One text's prediction and where it came from."""

    prediction: Prediction
    cache_hit: bool
    digest: str

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


@dataclass(frozen=True, slots=True)
class Inference:
    """What one request asked and got: the texts, their results, the model version.

    Resources leave it on ``req.context.inference``; the request middleware
    (``falcon_svc.middleware.context``) builds the request-log row from it.
    """

    texts: Sequence[str]
    results: Sequence[Result]
    model_version: str


class Classifier:
    """Answer from the cache where it can, else run the model; record metrics."""

    def __init__(self, model: Model, cache: ResponseCache | None = None) -> None:
        self.model = model
        self._cache = cache
        self._latency = metrics.INFERENCE_LATENCY.labels(model.scorer)
        self._per_label = {label: metrics.PREDICTIONS.labels(label, model.version) for label in model.labels}

    def classify(self, texts: Sequence[str]) -> list[Result]:
        """Return one result per text, in order; the misses go to the model in one call."""
        digests = [text_digest(text) for text in texts]
        cache = self._cache
        use_redis = cache is not None and cache.worth_asking_redis(sum(len(text) for text in texts))
        cached: list[Prediction | None] = (
            cache.get_many(digests, use_redis=use_redis) if cache is not None else [None] * len(texts)
        )
        missing = [index for index, prediction in enumerate(cached) if prediction is None]
        fresh: list[Prediction] = []
        if missing:
            fresh = self._predict([texts[index] for index in missing])
            if cache is not None:
                cache.put_many([digests[index] for index in missing], fresh, use_redis=use_redis)
        fresh_by_index = dict(zip(missing, fresh, strict=True))
        return [
            Result(prediction, True, digest) if prediction is not None else Result(fresh_by_index[index], False, digest)
            for index, (prediction, digest) in enumerate(zip(cached, digests, strict=True))
        ]

    def _predict(self, texts: list[str]) -> list[Prediction]:
        started = time.perf_counter()
        predictions = self.model.predict(texts)
        self._latency.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(texts))
        for prediction in predictions:
            self._per_label[prediction.label].inc()
        return predictions
