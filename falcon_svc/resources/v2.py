"""Open Inference Protocol v2 (KServe/Triton/MLServer's REST dialect).

Standard clients can call the model as a v2 server: one BYTES input named
``text`` of shape [n] in, tensors ``label`` [n], ``confidence`` [n] and
``probabilities`` [n, len(labels)] (row-major, label order in the model
metadata) out. Errors keep the service's one JSON shape.
"""

from __future__ import annotations

from typing import Any

import falcon

import falcon_svc
from falcon_svc.errors import APIError, invalid_input
from falcon_svc.inference import Classifier, Inference
from falcon_svc.resources.health import Readiness
from falcon_svc.settings import Settings
from falcon_svc.validation import is_encodable, read_json, require_object, require_texts

INPUT_NAME = "text"
OUTPUT_NAMES = ("label", "confidence", "probabilities")


class V2ServerResource:
    """``GET /v2``: server metadata."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"name": "falcon-svc", "version": falcon_svc.__version__, "extensions": []}


class V2LiveResource:
    """``GET /v2/health/live``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"live": True}


class V2ReadyResource:
    """``GET /v2/health/ready`` and ``GET /v2/models/{name}/ready``: 200 or 503."""

    def __init__(self, readiness: Readiness, model_name: str) -> None:
        self._readiness = readiness
        self._model_name = model_name

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str | None = None) -> None:
        if name is not None:
            _check_model_name(name, self._model_name)
        ready, _ = self._readiness.report()
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"ready": ready}


class V2ModelResource:
    """``GET /v2/models/{name}``: the model's tensors and versions."""

    def __init__(self, classifier: Classifier) -> None:
        model = classifier.model
        self._name = model.name
        self._body = {
            "name": model.name,
            "versions": [model.version],
            "platform": "scikit-learn",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "confidence", "datatype": "FP64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(model.labels)]},
            ],
            "parameters": {"labels": list(model.labels), "kind": model.kind},
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        _check_model_name(name, self._name)
        resp.media = self._body


class V2InferResource:
    """``POST /v2/models/{name}/infer``."""

    def __init__(self, classifier: Classifier, settings: Settings) -> None:
        self._classifier = classifier
        self._settings = settings

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        model = self._classifier.model
        _check_model_name(name, model.name)
        body = require_object(read_json(req, self._settings.max_body_bytes))
        texts = require_texts(
            _text_tensor_data(body), "inputs[0].data", self._settings.max_batch_size, self._settings.max_text_chars
        )
        wanted = _requested_outputs(body)
        results = self._classifier.classify(texts)
        req.context.inference = Inference(texts, results, model.version)
        predictions = [result.prediction for result in results]
        n = len(predictions)
        tensors = {
            "label": {"name": "label", "datatype": "BYTES", "shape": [n], "data": [p.label for p in predictions]},
            "confidence": {
                "name": "confidence",
                "datatype": "FP64",
                "shape": [n],
                "data": [p.confidence for p in predictions],
            },
            "probabilities": {
                "name": "probabilities",
                "datatype": "FP64",
                "shape": [n, len(model.labels)],
                "data": [p.probabilities[label] for p in predictions for label in model.labels],
                "parameters": {"labels": list(model.labels)},
            },
        }
        resp.media = {
            "model_name": model.name,
            "model_version": model.version,
            "id": _client_id(body.get("id")) or req.context.request_id,
            "outputs": [tensors[output] for output in wanted],
        }


def _client_id(value: Any) -> str | None:
    """Return the request's own ``id`` to echo, or None; reject one that cannot be echoed."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256 or not is_encodable(value):
        raise invalid_input("'id' must be a string of at most 256 valid Unicode characters.", "id")
    return value


def _check_model_name(name: str, served: str) -> None:
    if name != served:
        raise APIError(falcon.HTTP_404, "model_not_found", f"No model named {name!r}; this server serves {served!r}.")


def _text_tensor_data(body: dict[str, Any]) -> Any:
    """Return the ``data`` of the one BYTES tensor named ``text``, checking its header."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise invalid_input(f"'inputs' must be an array holding one tensor named {INPUT_NAME!r}.", "inputs")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise invalid_input(f"The input tensor must be named {INPUT_NAME!r}.", "inputs[0].name")
    if tensor.get("datatype") != "BYTES":
        raise invalid_input("The input tensor's datatype must be BYTES.", "inputs[0].datatype")
    data = tensor.get("data")
    shape = tensor.get("shape")
    # Accept [n] and the column-vector form [n, 1] that some clients send.
    if isinstance(data, list) and data and all(isinstance(item, list) and len(item) == 1 for item in data):
        data = [item[0] for item in data]
    if not isinstance(data, list) or shape not in ([len(data)], [len(data), 1]):
        raise invalid_input(
            "The input tensor's shape must be [n] with n the number of texts in 'data'.", "inputs[0].shape"
        )
    return data


def _requested_outputs(body: dict[str, Any]) -> tuple[str, ...]:
    """Return the outputs the client asked for (all of them by default)."""
    outputs = body.get("outputs")
    if outputs is None:
        return OUTPUT_NAMES
    if not isinstance(outputs, list) or not all(isinstance(item, dict) for item in outputs):
        raise invalid_input("'outputs' must be an array of objects with a 'name'.", "outputs")
    names = tuple(item.get("name") for item in outputs)
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown or not names:
        raise invalid_input(f"Unknown or missing output names {unknown}; choose from {list(OUTPUT_NAMES)}.", "outputs")
    return names
