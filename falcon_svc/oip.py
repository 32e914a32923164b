"""Speak the Open Inference Protocol v2 (KServe/Triton/MLServer's REST dialect) for our model.

Standard clients (``tritonclient.http``, KServe's) call the model as a v2 server:
one BYTES input named ``text`` of shape [n] in, tensors ``label`` [n],
``confidence`` [n] and ``probabilities`` [n, len(labels)] (row-major, label
order in the model metadata) out. The column vector [n, 1] is accepted as an
input shape too, since numpy clients often build one; its JSON ``data`` may be
flat or nested.

With the binary tensor extension (``falcon_svc.tensors``) the
``Inference-Header-Content-Length`` header splits the body into JSON and binary
tensor data. An input is binary when it has ``parameters.binary_data_size`` and
no ``data``; an output is binary when it says ``parameters.binary_data: true``,
or else when the request says ``parameters.binary_data_output: true``. A binary
reply is the JSON header then the tensors: label as BYTES, confidence and
probabilities as little-endian FP64.

This module turns a parsed request into texts and the outputs asked for, and
predictions into the reply; ``falcon_svc.resources.v2`` does the HTTP around it.
Errors: 400 (``invalid_request``) for a request that breaks the protocol
(binary framing, ``parameters``, ``outputs``), 422 (``invalid_input``) for a
tensor whose values break the contract (header, shape, count, text limits: the
same checks as /infer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import falcon

from falcon_svc.errors import APIError, invalid_input
from falcon_svc.model import Model, Prediction
from falcon_svc.tensors import (
    HEADER_LENGTH_HEADER,
    TensorDataError,
    decode_text_tensor,
    encode_bytes_element,
    encode_fp64_tensor,
)
from falcon_svc.validation import is_encodable, preview, require_texts

INPUT_NAME = "text"
OUTPUT_NAMES = ("label", "confidence", "probabilities")
TEXTS_FIELD = "inputs[0].data"
SHAPE_FIELD = "inputs[0].shape"

# (name, binary) for every output, as JSON or as binary: what a request without
# ``outputs`` gets, built once rather than per request.
_ALL_OUTPUTS = {flag: tuple((name, flag) for name in OUTPUT_NAMES) for flag in (False, True)}

OutputRequest = tuple[tuple[str, bool], ...]


def model_metadata(model: Model) -> dict[str, Any]:
    """Return the v2 model metadata of ``model``: its versions and tensors."""
    return {
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


def client_id(value: Any) -> str | None:
    """Return the request's own ``id`` to echo, or None; reject one that cannot be echoed."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256 or not is_encodable(value):
        raise invalid_input("'id' must be a string of at most 256 valid Unicode characters.", "id")
    return value


def decode_texts(
    body: dict[str, Any], binary: memoryview | None, max_batch_size: int, max_text_chars: int
) -> list[str]:
    """Return the normalised texts of the one BYTES input named ``text``, from JSON or binary data."""
    tensor = _text_tensor(body)
    count, column = _shape(tensor.get("shape"))
    size = _binary_data_size(tensor)
    if size is None:
        if binary:
            raise bad_request(
                f"{len(binary)} bytes follow the JSON header, but no input has 'binary_data_size'.",
                HEADER_LENGTH_HEADER,
            )
        data = tensor.get("data")
        if column and isinstance(data, list) and all(isinstance(row, list) and len(row) == 1 for row in data):
            data = [row[0] for row in data]
        if isinstance(data, list) and len(data) != count:
            raise _shape_error()
        return require_texts(data, TEXTS_FIELD, max_batch_size, max_text_chars)
    field = "inputs[0].parameters.binary_data_size"
    if "data" in tensor:
        raise bad_request("The input has both 'data' and 'binary_data_size'; send one of them.", field)
    if binary is None:
        raise bad_request(f"A binary input needs the {HEADER_LENGTH_HEADER} header.", field)
    if size != len(binary):
        raise bad_request(f"binary_data_size is {size}, but {len(binary)} bytes follow the JSON header.", field)
    if count > max_batch_size:
        raise invalid_input(f"'{TEXTS_FIELD}' has {count} texts; the limit is {max_batch_size}.", SHAPE_FIELD)
    try:
        data = decode_text_tensor(binary, count)
    except TensorDataError as ex:
        raise bad_request(str(ex), TEXTS_FIELD) from ex
    return require_texts(data, TEXTS_FIELD, max_batch_size, max_text_chars)


def requested_outputs(body: dict[str, Any]) -> OutputRequest:
    """Return (name, binary) for each output the client asked for, all of them by default."""
    default = _flag(_parameters(body, None), "binary_data_output", "parameters", default=False)
    outputs = body.get("outputs")
    if outputs is None:
        return _ALL_OUTPUTS[default]
    if not isinstance(outputs, list) or not outputs:
        raise bad_request(
            "'outputs' must be a non-empty array of objects with a 'name'; omit it to get every output.",
            "outputs",
        )
    wanted: list[tuple[str, bool]] = []
    for index, item in enumerate(outputs):
        field = f"outputs[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{field}' must be an object with a 'name'.", field)
        name = item.get("name")
        if not isinstance(name, str) or name not in OUTPUT_NAMES:
            raise bad_request(
                f"Unknown output {preview(name)}; choose from {', '.join(OUTPUT_NAMES)}.", f"{field}.name"
            )
        if any(name == seen for seen, _ in wanted):
            raise bad_request(f"The output {name!r} is requested twice.", f"{field}.name")
        parameters = _parameters(item, field)
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in parameters:
                raise bad_request(
                    f"'{unsupported}' is not supported by this server.", f"{field}.parameters.{unsupported}"
                )
        wanted.append((name, _flag(parameters, "binary_data", f"{field}.parameters", default=default)))
    return tuple(wanted)


class ReplyEncoder:
    """Shape one model's predictions as the reply a v2 client asked for."""

    def __init__(self, model: Model) -> None:
        self._name = model.name
        self._version = model.version
        self._labels = tuple(model.labels)
        # Each label's binary BYTES element, built once rather than per request.
        self._label_elements = {label: encode_bytes_element(label.encode("utf-8")) for label in model.labels}

    def reply(
        self, reply_id: str, wanted: OutputRequest, predictions: Sequence[Prediction]
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Return the reply's JSON and, in order, the data of each output sent as binary."""
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
        reply = {"model_name": self._name, "model_version": self._version, "id": reply_id, "outputs": outputs}
        return reply, blobs

    def _output(self, name: str, predictions: Sequence[Prediction]) -> tuple[dict[str, Any], list[Any]]:
        """Return one output tensor without its data, and its values in row-major order."""
        n = len(predictions)
        if name == "confidence":
            return {"name": name, "datatype": "FP64", "shape": [n]}, [p.confidence for p in predictions]
        if name == "probabilities":
            labels = self._labels
            tensor = {"name": name, "datatype": "FP64", "shape": [n, len(labels)], "parameters": {"labels": labels}}
            return tensor, [p.probabilities[label] for p in predictions for label in labels]
        return {"name": name, "datatype": "BYTES", "shape": [n]}, [p.label for p in predictions]


def binary_reply(reply: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int]:
    """Return the body of a binary reply (compact JSON header, then ``blobs``) and the header's length."""
    header = json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"".join((header, *blobs)), len(header)


def bad_request(message: str, field: str | None) -> APIError:
    """Return the 400 for a request that breaks the protocol (rather than the tensor contract)."""
    return APIError(falcon.HTTP_400, "invalid_request", message, field=field)


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
        raise bad_request("Shared memory is not supported by this server.", f"{field}.shared_memory_region")
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise bad_request(f"'{field}.binary_data_size' must be a non-negative integer.", f"{field}.binary_data_size")
    return size


def _parameters(holder: dict[str, Any], field: str | None) -> dict[str, Any]:
    """Return the ``parameters`` object of the request (``field`` None) or of one of its tensors."""
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        where = f"{field}.parameters" if field else "parameters"
        raise bad_request(f"'{where}' must be an object.", where)
    return parameters


def _flag(parameters: dict[str, Any], key: str, field: str, *, default: bool) -> bool:
    """Return the boolean ``parameters[key]``, or ``default`` when it is absent."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f"'{field}.{key}' must be true or false.", f"{field}.{key}")
    return value
