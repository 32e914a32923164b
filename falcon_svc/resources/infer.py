"""``POST /infer`` and ``POST /infer/batch``: the service's own JSON contract."""

from __future__ import annotations

import falcon

from falcon_svc.inference import Classifier, Inference
from falcon_svc.middleware import elapsed_ms
from falcon_svc.settings import Settings
from falcon_svc.validation import read_json, require_object, require_text, require_texts


class _InferenceResource:
    """What both inference resources hold: the classifier, the limits, the worker's id."""

    def __init__(self, classifier: Classifier, settings: Settings, worker_id: str) -> None:
        self._classifier = classifier
        self._settings = settings
        self._worker_id = worker_id


class InferResource(_InferenceResource):
    """Classify one text."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = require_object(read_json(req, self._settings.max_body_bytes))
        text = require_text(body.get("text"), "text", self._settings.max_text_chars)
        (result,) = self._classifier.classify([text])
        version = self._classifier.model.version
        req.context.inference = Inference([text], [result], version)
        reply = result.to_body(version)
        reply["worker_id"] = self._worker_id
        reply["request_id"] = req.context.request_id
        reply["processing_time_ms"] = elapsed_ms(req)
        resp.media = reply


class BatchInferResource(_InferenceResource):
    """Classify 1 to ``MAX_BATCH_SIZE`` texts in one vectorised call."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = require_object(read_json(req, self._settings.max_body_bytes))
        texts = require_texts(body.get("texts"), "texts", self._settings.max_batch_size, self._settings.max_text_chars)
        version = self._classifier.model.version
        results = self._classifier.classify(texts)
        req.context.inference = Inference(texts, results, version)
        resp.media = {
            "results": [result.to_body(version) for result in results],
            "count": len(results),
            "model_version": version,
            "worker_id": self._worker_id,
            "request_id": req.context.request_id,
            "processing_time_ms": elapsed_ms(req),
        }
