"""Open Inference Protocol v2 (KServe/Triton/MLServer's REST dialect).

Standard clients (``tritonclient.http``, KServe's) call the model as a v2 server:
one BYTES input named ``text`` of shape [n] in, tensors ``label`` [n],
``confidence`` [n] and ``probabilities`` [n, len(labels)] (row-major, label
order in the model metadata) out. The column vector [n, 1] is accepted as an
input shape too, since numpy clients often build one; its JSON ``data`` may be
flat or nested.

The body is JSON, sent with no Content-Type (tritonclient sends none) or as
application/json. With the binary tensor extension (``falcon_svc.tensors``) the
``Inference-Header-Content-Length`` header splits the body into that JSON and
binary tensor data, and the body may then be application/octet-stream too. An
input is binary when it has ``parameters.binary_data_size`` and no ``data``; an
output is binary when it says ``parameters.binary_data: true``, or else when the
request says ``parameters.binary_data_output: true``. A binary reply is
application/octet-stream with ``Inference-Header-Content-Length``: label as
BYTES, confidence and probabilities as little-endian FP64.

Statuses: 400 for a body that breaks the protocol (JSON, binary framing,
``parameters``, ``outputs``), 422 for a tensor whose values break the contract
(header, shape, count, text limits: the same checks as /infer), 404 for another
model or version, 415 for another media type or a compressed body. Every error
body is OIP's ``{"error": "<message>"}`` (``errors.serialize_error``).
"""

from __future__ import annotations

import json
from typing import Any

import falcon

import falcon_svc
from falcon_svc.errors import APIError, invalid_input
from falcon_svc.inference import Classifier, Inference
from falcon_svc.model import Model, Prediction
from falcon_svc.resources.health import Readiness
from falcon_svc.settings import Settings
from falcon_svc.tensors import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH_HEADER,
    TensorDataError,
    decode_text_tensor,
    encode_bytes_element,
    encode_fp64_tensor,
    split_body,
)
from falcon_svc.validation import is_encodable, parse_json, request_body, require_object, require_texts

INPUT_NAME = "text"
OUTPUT_NAMES = ("label", "confidence", "probabilities")
EXTENSIONS = ("binary_tensor_data",)
TEXTS_FIELD = "inputs[0].data"
SHAPE_FIELD = "inputs[0].shape"
JSON_MEDIA_TYPES = ("", falcon.MEDIA_JSON)


class V2ServerResource:
    """``GET /v2``: server metadata."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"name": "falcon-svc", "version": falcon_svc.__version__, "extensions": list(EXTENSIONS)}


class V2LiveResource:
    """``GET /v2/health/live``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"live": True}


class V2ReadyResource:
    """``GET /v2/health/ready`` and ``/v2/models/{name}[/versions/{version}]/ready``: 200 or 503.

    NOTE: OIP says any 4xx means "not ready"; 503 is kept, as on /readyz, so load
    balancers and probes read it as "send no traffic" (tritonclient only checks
    for 200). The body says why, in OIP's ``error`` key.
    """

    def __init__(self, readiness: Readiness, model: Model) -> None:
        self._readiness = readiness
        self._model = model

    def on_get(
        self, req: falcon.Request, resp: falcon.Response, name: str | None = None, version: str | None = None
    ) -> None:
        if name is not None:
            check_model(self._model, name, version)
        ready, detail = self._readiness.report()
        if ready:
            resp.media = {"ready": True}
            return
        resp.status = falcon.HTTP_503
        resp.media = {"ready": False, "error": f"Not ready: {', '.join(detail['reasons'])}."}


class V2ModelResource:
    """``GET /v2/models/{name}[/versions/{version}]``: the model's tensors and versions."""

    def __init__(self, model: Model) -> None:
        self._model = model
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

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        check_model(self._model, name, version)
        resp.media = self._body


class V2InferResource:
    """``POST /v2/models/{name}[/versions/{version}]/infer``."""

    def __init__(self, classifier: Classifier, settings: Settings) -> None:
        self._classifier = classifier
        self._settings = settings
        model = classifier.model
        self._labels = tuple(model.labels)
        # Each label's binary BYTES element, built once rather than per request.
        self._label_elements = {label: encode_bytes_element(label.encode("utf-8")) for label in model.labels}
        self._all_outputs = {flag: tuple((name, flag) for name in OUTPUT_NAMES) for flag in (False, True)}

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        model = self._classifier.model
        check_model(model, name, version)
        body, binary = self._read(req)
        client_id = _client_id(body.get("id"))
        texts = self._texts(body, binary)
        wanted = self._requested_outputs(body)
        results = self._classifier.classify(texts)
        req.context.inference = Inference(texts, results, model.version)
        predictions = [result.prediction for result in results]
        outputs: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for output, as_binary in wanted:
            tensor, values = self._output(output, predictions)
            if as_binary:
                if output == "label":
                    blob = b"".join([self._label_elements[label] for label in values])
                else:
                    blob = encode_fp64_tensor(values)
                tensor["parameters"] = {**tensor.get("parameters", {}), "binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = values
            outputs.append(tensor)
        reply = {
            "model_name": model.name,
            "model_version": model.version,
            "id": client_id or req.context.request_id,
            "outputs": outputs,
        }
        if not blobs:
            resp.media = reply
            return
        header = json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        resp.data = b"".join((header, *blobs))
        resp.content_type = BINARY_MEDIA_TYPE
        resp.set_header(HEADER_LENGTH_HEADER, str(len(header)))

    def _read(self, req: falcon.Request) -> tuple[dict[str, Any], memoryview | None]:
        """Return the request's JSON object and, with the binary extension, the bytes after it."""
        header_length = req.get_header(HEADER_LENGTH_HEADER)
        _check_media_type(req, binary=header_length is not None)
        raw = request_body(req, self._settings.max_body_bytes)
        if header_length is None:
            return require_object(parse_json(raw)), None
        try:
            header, binary = split_body(raw, header_length)
        except TensorDataError as ex:
            raise _bad_request(str(ex), HEADER_LENGTH_HEADER) from ex
        return require_object(parse_json(header)), binary

    def _texts(self, body: dict[str, Any], binary: memoryview | None) -> list[str]:
        """Return the normalised texts of the one BYTES input named ``text``."""
        settings = self._settings
        tensor = _text_tensor(body)
        count, column = _shape(tensor.get("shape"))
        size = _binary_data_size(tensor)
        if size is None:
            if binary:
                raise _bad_request(
                    f"{len(binary)} bytes follow the JSON header, but no input has 'binary_data_size'.",
                    HEADER_LENGTH_HEADER,
                )
            data = tensor.get("data")
            if column and isinstance(data, list) and all(isinstance(row, list) and len(row) == 1 for row in data):
                data = [row[0] for row in data]
            if isinstance(data, list) and len(data) != count:
                raise _shape_error()
            return require_texts(data, TEXTS_FIELD, settings.max_batch_size, settings.max_text_chars)
        field = "inputs[0].parameters.binary_data_size"
        if "data" in tensor:
            raise _bad_request("The input has both 'data' and 'binary_data_size'; send one of them.", field)
        if binary is None:
            raise _bad_request(f"A binary input needs the {HEADER_LENGTH_HEADER} header.", field)
        if size != len(binary):
            raise _bad_request(f"binary_data_size is {size}, but {len(binary)} bytes follow the JSON header.", field)
        if count > settings.max_batch_size:
            raise invalid_input(
                f"'{TEXTS_FIELD}' has {count} texts; the limit is {settings.max_batch_size}.", SHAPE_FIELD
            )
        try:
            data = decode_text_tensor(binary, count)
        except TensorDataError as ex:
            raise _bad_request(str(ex), TEXTS_FIELD) from ex
        return require_texts(data, TEXTS_FIELD, settings.max_batch_size, settings.max_text_chars)

    def _requested_outputs(self, body: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
        """Return (name, binary) for each output the client asked for, all of them by default."""
        default = _flag(_parameters(body, None), "binary_data_output", "parameters", default=False)
        outputs = body.get("outputs")
        if outputs is None:
            return self._all_outputs[default]
        if not isinstance(outputs, list) or not outputs:
            raise _bad_request(
                "'outputs' must be a non-empty array of objects with a 'name'; omit it to get every output.",
                "outputs",
            )
        wanted: list[tuple[str, bool]] = []
        for index, item in enumerate(outputs):
            field = f"outputs[{index}]"
            if not isinstance(item, dict):
                raise _bad_request(f"'{field}' must be an object with a 'name'.", field)
            name = item.get("name")
            if not isinstance(name, str) or name not in OUTPUT_NAMES:
                raise _bad_request(
                    f"Unknown output {_preview(name)}; choose from {', '.join(OUTPUT_NAMES)}.", f"{field}.name"
                )
            if any(name == seen for seen, _ in wanted):
                raise _bad_request(f"The output {name!r} is requested twice.", f"{field}.name")
            parameters = _parameters(item, field)
            for unsupported in ("classification", "shared_memory_region"):
                if unsupported in parameters:
                    raise _bad_request(
                        f"'{unsupported}' is not supported by this server.", f"{field}.parameters.{unsupported}"
                    )
            wanted.append((name, _flag(parameters, "binary_data", f"{field}.parameters", default=default)))
        return tuple(wanted)

    def _output(self, name: str, predictions: list[Prediction]) -> tuple[dict[str, Any], list[Any]]:
        """Return one output tensor without its data, and its values in row-major order."""
        n = len(predictions)
        if name == "confidence":
            return {"name": name, "datatype": "FP64", "shape": [n]}, [p.confidence for p in predictions]
        if name == "probabilities":
            labels = self._labels
            tensor = {"name": name, "datatype": "FP64", "shape": [n, len(labels)], "parameters": {"labels": labels}}
            return tensor, [p.probabilities[label] for p in predictions for label in labels]
        return {"name": name, "datatype": "BYTES", "shape": [n]}, [p.label for p in predictions]


def check_model(model: Model, name: str, version: str | None) -> None:
    """Raise a 404 unless ``name`` (and ``version``, if given) are the served model's."""
    if name != model.name:
        raise APIError(
            falcon.HTTP_404, "model_not_found", f"No model named {name!r}; this server serves {model.name!r}."
        )
    if version is not None and version != model.version:
        raise APIError(
            falcon.HTTP_404,
            "model_version_not_found",
            f"Model {model.name!r} has no version {version!r}; this server serves version {model.version!r}.",
        )


def _check_media_type(req: falcon.Request, *, binary: bool) -> None:
    """Raise a 415 unless the body is JSON (or binary-extension bytes) and not compressed."""
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if not (media_type in JSON_MEDIA_TYPES or (binary and media_type == BINARY_MEDIA_TYPE)):
        raise APIError(
            falcon.HTTP_415,
            "unsupported_media_type",
            f"Send the body as JSON (application/json or no Content-Type), or as {BINARY_MEDIA_TYPE} "
            f"with the {HEADER_LENGTH_HEADER} header (got {(req.content_type or '')[:80]}).",
        )
    encoding = req.get_header("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise APIError(
            falcon.HTTP_415,
            "unsupported_media_type",
            f"Compressed request bodies are not supported (Content-Encoding: {encoding[:40]}); send them plain.",
        )


def _client_id(value: Any) -> str | None:
    """Return the request's own ``id`` to echo, or None; reject one that cannot be echoed."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256 or not is_encodable(value):
        raise invalid_input("'id' must be a string of at most 256 valid Unicode characters.", "id")
    return value


def _text_tensor(body: dict[str, Any]) -> dict[str, Any]:
    """Return the one input tensor, checking its name and datatype."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise invalid_input(f"'inputs' must be an array holding one tensor named {INPUT_NAME!r}.", "inputs")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise invalid_input(f"The input tensor must be named {INPUT_NAME!r}.", "inputs[0].name")
    if tensor.get("datatype") != "BYTES":
        raise invalid_input("The input tensor's datatype must be BYTES.", "inputs[0].datatype")
    return tensor


def _shape(shape: Any) -> tuple[int, bool]:
    """Return (n, is a column vector) for a shape [n] or [n, 1]."""
    # NOTE: type() rather than isinstance(): JSON true is a Python int, and [true] == [1].
    if (
        not isinstance(shape, list)
        or len(shape) not in (1, 2)
        or not all(type(dim) is int for dim in shape)
        or shape[0] < 0
        or shape[1:] not in ([], [1])
    ):
        raise _shape_error()
    return shape[0], len(shape) == 2


def _shape_error() -> APIError:
    return invalid_input(
        "The input tensor's shape must be [n] (or [n, 1]) with n the number of texts in its data.", SHAPE_FIELD
    )


def _binary_data_size(tensor: dict[str, Any]) -> int | None:
    """Return the input's ``parameters.binary_data_size``, or None if its data is JSON."""
    field = "inputs[0].parameters"
    parameters = _parameters(tensor, "inputs[0]")
    if "shared_memory_region" in parameters:
        raise _bad_request("Shared memory is not supported by this server.", f"{field}.shared_memory_region")
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise _bad_request(f"'{field}.binary_data_size' must be a non-negative integer.", f"{field}.binary_data_size")
    return size


def _parameters(holder: dict[str, Any], field: str | None) -> dict[str, Any]:
    """Return the ``parameters`` object of the request (``field`` None) or of one of its tensors."""
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        where = f"{field}.parameters" if field else "parameters"
        raise _bad_request(f"'{where}' must be an object.", where)
    return parameters


def _flag(parameters: dict[str, Any], key: str, field: str, *, default: bool) -> bool:
    """Return the boolean ``parameters[key]``, or ``default`` when it is absent."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise _bad_request(f"'{field}.{key}' must be true or false.", f"{field}.{key}")
    return value


def _preview(value: Any) -> str:
    """Show a client's value in a message, cut short: it may be megabytes."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _bad_request(message: str, field: str | None) -> APIError:
    return APIError(falcon.HTTP_400, "invalid_request", message, field=field)
