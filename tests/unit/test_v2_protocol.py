"""Open Inference Protocol v2: what standard clients send and expect (in-process, Falcon's TestClient).

Binary bodies are built and read here with ``struct`` by hand, not with
``falcon_svc.tensors``, so the codec is checked against the protocol rather
than against itself.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import falcon
import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from falcon_svc.app import create_app
from falcon_svc.dependencies import Dependencies
from falcon_svc.lifecycle import Lifecycle
from falcon_svc.model import Model
from falcon_svc.settings import Settings
from falcon_svc.tensors import TensorDataError, decode_text_tensor, encode_fp64_tensor, split_body

JSON = {"Content-Type": "application/json"}
HEADER_LENGTH = "Inference-Header-Content-Length"


def infer(client, model: Model, body: object, name: str | None = None, headers: dict | None = None):
    return client.simulate_post(
        f"/v2/models/{name or model.name}/infer", body=json.dumps(body), headers=JSON if headers is None else headers
    )


def text_input(texts: list, shape: list | None = None) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}]}


def bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def binary_request(
    texts: Sequence[str], *, extra: dict | None = None, data: bytes | None = None, size: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """Return (body, headers) for a binary-input request, optionally lying about the data or its size."""
    data = bytes_elements(*(text.encode() for text in texts)) if data is None else data
    tensor = {
        "name": "text",
        "datatype": "BYTES",
        "shape": [len(texts)],
        "parameters": {"binary_data_size": len(data) if size is None else size},
    }
    header = json.dumps({"inputs": [tensor], **(extra or {})}).encode()
    return header + data, {HEADER_LENGTH: str(len(header))}


def post_binary(client, model: Model, body: bytes, headers: dict[str, str]):
    return client.simulate_post(f"/v2/models/{model.name}/infer", body=body, headers=headers)


def read_binary_reply(result) -> dict[str, Any]:
    """Split a binary reply the way tritonclient's InferResult does; return {output name: values}."""
    assert result.headers["content-type"] == "application/octet-stream", result.headers
    length = int(result.headers[HEADER_LENGTH])
    header = json.loads(result.content[:length])
    buffer = result.content[length:]
    values: dict[str, Any] = {"_header": header}
    offset = 0
    for output in header["outputs"]:
        if "data" in output:
            values[output["name"]] = output["data"]
            continue
        size = output["parameters"]["binary_data_size"]
        chunk = buffer[offset : offset + size]
        offset += size
        if output["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(chunk):
                (n,) = struct.unpack_from("<I", chunk, at)
                items.append(chunk[at + 4 : at + 4 + n].decode())
                at += 4 + n
            values[output["name"]] = items
        else:
            values[output["name"]] = list(struct.unpack(f"<{size // 8}d", chunk))
    assert offset == len(buffer), f"{len(buffer) - offset} bytes after the last binary output"
    return values


def assert_oip_error(result, status: int, code: str, field: str | None = None) -> str:
    """Check the OIP error shape (message string under "error") and return the message."""
    assert result.status_code == status, f"expected {status}, got {result.status_code}: {result.text}"
    assert result.headers["content-type"].startswith("application/json"), result.headers
    body = result.json
    assert set(body) == {"error", "code", "field"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["code"] == code, body
    if field is not None:
        assert body["field"] == field, body
    return body["error"]


def expected_outputs(model: Model, texts: list[str]) -> dict[str, list]:
    predictions = model.predict(texts)
    return {
        "label": [p.label for p in predictions],
        "confidence": [p.confidence for p in predictions],
        "probabilities": [p.probabilities[label] for p in predictions for label in model.labels],
    }


# --- metadata, health, readiness ---------------------------------------------------------------


def test_server_metadata_and_health(client):
    server = client.simulate_get("/v2").json
    assert server["name"] == "falcon-svc" and server["extensions"] == ["binary_tensor_data"]
    assert client.simulate_get("/v2/health/live").json == {"live": True}
    assert client.simulate_get("/v2/health/ready").json == {"ready": True}


def test_model_metadata_names_tensors(client, model: Model):
    body = client.simulate_get(f"/v2/models/{model.name}").json
    assert body["name"] == model.name and body["versions"] == [model.version]
    assert body["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [output["name"] for output in body["outputs"]] == ["label", "confidence", "probabilities"]
    assert client.simulate_get(f"/v2/models/{model.name}/ready").json == {"ready": True}


def test_versioned_routes_answer_for_the_served_version(client, model: Model):
    base = f"/v2/models/{model.name}/versions/{model.version}"
    assert client.simulate_get(base).json == client.simulate_get(f"/v2/models/{model.name}").json
    assert client.simulate_get(f"{base}/ready").json == {"ready": True}
    result = client.simulate_post(f"{base}/infer", body=json.dumps(text_input(["great"])), headers=JSON)
    assert result.status_code == 200, result.text


@pytest.mark.parametrize("suffix", ["", "/ready", "/infer"])
def test_unknown_version_is_an_oip_404(client, model: Model, suffix):
    path = f"/v2/models/{model.name}/versions/no-such-version{suffix}"
    method = "POST" if suffix == "/infer" else "GET"
    result = client.simulate_request(method, path, body=json.dumps(text_input(["x"])), headers=JSON)
    assert "no-such-version" in assert_oip_error(result, 404, "model_version_not_found")


def test_not_ready_is_503_saying_why(client, model: Model, lifecycle: Lifecycle):
    lifecycle.begin_drain()
    for path in ("/v2/health/ready", f"/v2/models/{model.name}/ready"):
        result = client.simulate_get(path)
        assert result.status_code == 503, result.text
        assert result.json == {"ready": False, "error": "Not ready: draining."}


# --- JSON inference -------------------------------------------------------------------------------


def test_infer_returns_tensors_matching_the_model(client, model: Model):
    texts = ["I adore this phone", "The screen cracked on day one"]
    result = infer(client, model, {"id": "req-7", **text_input(texts)})
    assert result.status_code == 200, result.text
    body = result.json
    assert body["model_name"] == model.name and body["model_version"] == model.version and body["id"] == "req-7"
    outputs = {output["name"]: output for output in body["outputs"]}
    expected = expected_outputs(model, texts)
    assert outputs["label"]["data"] == expected["label"]
    assert outputs["probabilities"]["shape"] == [2, len(model.labels)]
    assert outputs["probabilities"]["data"] == pytest.approx(expected["probabilities"], abs=1e-12)
    assert outputs["confidence"]["data"] == pytest.approx(expected["confidence"], abs=1e-12)


def test_without_an_id_the_request_id_is_echoed(client, model: Model):
    result = infer(client, model, text_input(["fine"]), headers={**JSON, "X-Request-ID": "abc-123"})
    assert result.status_code == 200 and result.json["id"] == "abc-123", result.text


@pytest.mark.parametrize("data", [[["good"], ["bad"]], ["good", "bad"]])
def test_column_vector_shape_takes_nested_or_flat_data(client, model: Model, data):
    body = {**text_input(data, shape=[2, 1]), "outputs": [{"name": "label"}]}
    result = infer(client, model, body)
    assert result.status_code == 200, result.text
    assert [output["name"] for output in result.json["outputs"]] == ["label"]
    assert result.json["outputs"][0]["data"] == expected_outputs(model, ["good", "bad"])["label"]


@pytest.mark.parametrize(
    "headers",
    [{}, JSON, {"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "APPLICATION/JSON"}],
    ids=["none", "json", "json-charset", "json-upper"],
)
def test_json_bodies_need_no_content_type(client, model: Model, headers):
    result = infer(client, model, text_input(["good"]), headers=headers)
    assert result.status_code == 200, result.text


def test_subset_of_outputs_in_the_order_asked(client, model: Model):
    body = {**text_input(["good"]), "outputs": [{"name": "probabilities"}, {"name": "label"}]}
    result = infer(client, model, body)
    assert [output["name"] for output in result.json["outputs"]] == ["probabilities", "label"], result.text


# --- the binary tensor extension -----------------------------------------------------------------


def test_binary_input_gives_the_same_answer_as_json(client, model: Model):
    texts = ["I adore this phone", "naïve café ☕"]
    body, headers = binary_request(texts)
    result = post_binary(client, model, body, headers)
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("application/json"), "JSON outputs were asked for"
    outputs = {output["name"]: output["data"] for output in result.json["outputs"]}
    assert outputs["label"] == expected_outputs(model, texts)["label"]


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "application/json"])
def test_binary_bodies_take_octet_stream_or_nothing(client, model: Model, content_type):
    body, headers = binary_request(["good"])
    if content_type:
        headers["Content-Type"] = content_type
    assert post_binary(client, model, body, headers).status_code == 200


def test_binary_data_output_makes_every_output_binary(client, model: Model):
    texts = ["I adore this phone", "The screen cracked on day one", "meh"]
    body, headers = binary_request(texts, extra={"parameters": {"binary_data_output": True}})
    result = post_binary(client, model, body, headers)
    assert result.status_code == 200, result.text
    values = read_binary_reply(result)
    expected = expected_outputs(model, texts)
    assert values["label"] == expected["label"]
    assert values["confidence"] == pytest.approx(expected["confidence"], abs=0)
    assert values["probabilities"] == pytest.approx(expected["probabilities"], abs=0)
    header = values["_header"]
    assert all("data" not in output for output in header["outputs"]), header
    probabilities = next(output for output in header["outputs"] if output["name"] == "probabilities")
    assert probabilities["parameters"] == {"labels": list(model.labels), "binary_data_size": 8 * 3 * 3}
    assert probabilities["shape"] == [3, len(model.labels)]


def test_an_outputs_own_binary_flag_overrides_the_request_default(client, model: Model):
    outputs = [{"name": "label", "parameters": {"binary_data": False}}, {"name": "confidence"}]
    request = {**text_input(["good", "bad"]), "parameters": {"binary_data_output": True}, "outputs": outputs}
    result = infer(client, model, request, headers={})
    values = read_binary_reply(result)
    by_name = {output["name"]: output for output in values["_header"]["outputs"]}
    assert by_name["label"]["data"] == expected_outputs(model, ["good", "bad"])["label"]
    assert by_name["confidence"]["parameters"] == {"binary_data_size": 16}


def test_binary_output_on_request_of_json_input(client, model: Model):
    request = {**text_input(["good"]), "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}
    values = read_binary_reply(infer(client, model, request, headers={}))
    assert values["label"] == expected_outputs(model, ["good"])["label"]
    assert list(values) == ["_header", "label"]


@pytest.mark.parametrize(
    ("texts", "data", "size", "field", "message"),
    [
        (["ab"], bytes_elements(b"ab"), 3, "inputs[0].parameters.binary_data_size", "binary_data_size is 3"),
        (["ab"], bytes_elements(b"ab"), 5, "inputs[0].parameters.binary_data_size", "binary_data_size is 5"),
        (["ab"], struct.pack("<I", 10) + b"abc", None, "inputs[0].data", "says it has 10 bytes"),
        (["a", "b"], bytes_elements(b"a") + b"\x01\x00", None, "inputs[0].data", "ends after 1 of 2"),
        (["a"], bytes_elements(b"a", b"b"), None, "inputs[0].data", "5 bytes follow the 1 elements"),
        (["a"], bytes_elements(b"a") + b"\x00", None, "inputs[0].data", "1 bytes follow"),
        (["x"], bytes_elements(b"\xff\xfe"), None, "inputs[0].data", "not valid UTF-8"),
        (["x"], bytes_elements(b"\xed\xa0\x80"), None, "inputs[0].data", "not valid UTF-8"),
    ],
    ids=["size-short", "size-long", "element-cut", "prefix-cut", "extra-element", "trailing", "utf8", "surrogate"],
)
def test_malformed_binary_data_is_400_naming_the_problem(client, model: Model, texts, data, size, field, message):
    body, headers = binary_request(texts, data=data, size=size)
    assert message in assert_oip_error(post_binary(client, model, body, headers), 400, "invalid_request", field)


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1e3", "99999", "", "٣"])
def test_a_bad_header_length_is_400(client, model: Model, value):
    body, _ = binary_request(["good"])
    result = post_binary(client, model, body, {HEADER_LENGTH: value})
    assert_oip_error(result, 400, "invalid_request", HEADER_LENGTH)


def test_a_header_length_inside_the_json_is_400_invalid_json(client, model: Model):
    body, headers = binary_request(["good"])
    result = post_binary(client, model, body, {HEADER_LENGTH: str(int(headers[HEADER_LENGTH]) - 1)})
    assert_oip_error(result, 400, "invalid_json")


def test_binary_bytes_without_a_binary_input_are_400(client, model: Model):
    header = json.dumps(text_input(["good"])).encode()
    result = post_binary(client, model, header + b"junk", {HEADER_LENGTH: str(len(header))})
    assert "4 bytes follow" in assert_oip_error(result, 400, "invalid_request", HEADER_LENGTH)


@pytest.mark.parametrize(
    ("tensor_change", "headers", "field"),
    [
        ({"data": ["good"]}, None, "inputs[0].parameters.binary_data_size"),
        ({}, {}, "inputs[0].parameters.binary_data_size"),
        ({"parameters": {"binary_data_size": -1}}, None, "inputs[0].parameters.binary_data_size"),
        ({"parameters": {"binary_data_size": True}}, None, "inputs[0].parameters.binary_data_size"),
        ({"parameters": {"binary_data_size": "8"}}, None, "inputs[0].parameters.binary_data_size"),
        ({"parameters": {"binary_data_size": 8, "shared_memory_region": "r"}}, None, None),
        ({"parameters": "binary"}, None, "inputs[0].parameters"),
    ],
    ids=["data-too", "no-header", "negative", "bool", "string", "shared-memory", "not-object"],
)
def test_inconsistent_binary_inputs_are_400(client, model: Model, tensor_change, headers, field):
    data = bytes_elements(b"good")
    header = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}
    header["inputs"][0].update(tensor_change)
    raw = json.dumps(header).encode()
    result = post_binary(client, model, raw + data, {HEADER_LENGTH: str(len(raw))} if headers is None else headers)
    if headers == {}:  # no header at all: the body is not JSON
        assert_oip_error(result, 400, "invalid_json")
    else:
        assert_oip_error(result, 400, "invalid_request", field)


def test_binary_texts_obey_the_same_limits_as_json(client, model: Model, settings: Settings):
    body, headers = binary_request(["fine", "   "])
    assert_oip_error(post_binary(client, model, body, headers), 422, "invalid_input", "inputs[0].data[1]")
    too_long = "x" * (settings.max_text_chars + 1)
    body, headers = binary_request([too_long])
    assert_oip_error(post_binary(client, model, body, headers), 422, "invalid_input", "inputs[0].data[0]")
    many = ["x"] * (settings.max_batch_size + 1)
    body, headers = binary_request(many)
    assert_oip_error(post_binary(client, model, body, headers), 422, "invalid_input", "inputs[0].shape")


@settings(max_examples=200, suppress_health_check=list(HealthCheck), deadline=None)
@given(
    prefix=st.sampled_from([b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],', b"{", b""]),
    raw=st.binary(max_size=120),
    cut=st.integers(min_value=-5, max_value=200),
)
def test_any_binary_body_never_yields_5xx(client, model, prefix, raw, cut):
    body = prefix + raw
    result = post_binary(client, model, body, {HEADER_LENGTH: str(cut)})
    assert result.status_code < 500, result.text
    assert isinstance(result.json["error"], str), result.json


@settings(max_examples=200, suppress_health_check=list(HealthCheck), deadline=None)
@given(elements=st.lists(st.binary(max_size=12), max_size=4), shape=st.integers(0, 5), size_delta=st.integers(-3, 3))
def test_any_binary_tensor_is_classified_or_refused_with_4xx(client, model, elements, shape, size_delta):
    data = bytes_elements(*elements)
    tensor = {"name": "text", "datatype": "BYTES", "shape": [shape], "parameters": {"binary_data_size": 0}}
    tensor["parameters"]["binary_data_size"] = max(0, len(data) + size_delta)
    header = json.dumps({"inputs": [tensor]}).encode()
    result = post_binary(client, model, header + data, {HEADER_LENGTH: str(len(header))})
    assert result.status_code in (200, 400, 422), result.text


# --- errors: OIP's shape on every /v2 route, the service's everywhere else -----------------------


def test_unknown_model_is_404(client, model: Model):
    assert "'other'" in assert_oip_error(infer(client, model, text_input(["x"]), name="other"), 404, "model_not_found")
    assert_oip_error(client.simulate_get("/v2/models/other"), 404, "model_not_found")
    assert_oip_error(client.simulate_get("/v2/models/other/ready"), 404, "model_not_found")


@pytest.mark.parametrize("path", ["/v2/nope", "/v2/models/sentiment/config", "/v2/health"])
def test_unknown_routes_under_v2_are_oip_404s(client, path):
    assert path in assert_oip_error(client.simulate_get(path), 404, "not_found")


@pytest.mark.parametrize(("method", "path"), [("DELETE", "/v2/health/live"), ("GET", "/v2/models/m/infer")])
def test_wrong_method_under_v2_is_an_oip_405(client, method, path):
    assert_oip_error(client.simulate_request(method, path), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("headers", "with_length"),
    [
        ({"Content-Type": "text/plain"}, False),
        ({"Content-Type": "application/octet-stream"}, False),
        ({"Content-Type": "application/x-www-form-urlencoded"}, True),
        ({"Content-Encoding": "gzip"}, False),
    ],
    ids=["text-plain", "octet-stream-without-header", "form", "gzip"],
)
def test_other_media_types_are_oip_415s(client, model: Model, headers, with_length):
    body, binary_headers = binary_request(["good"])
    if not with_length:
        body = json.dumps(text_input(["good"])).encode()
        binary_headers = {}
    result = post_binary(client, model, body, {**binary_headers, **headers})
    assert_oip_error(result, 415, "unsupported_media_type")


def test_body_over_the_limit_is_an_oip_413(client, model: Model, settings: Settings):
    body = json.dumps(text_input(["x" * settings.max_body_bytes])).encode()
    assert_oip_error(post_binary(client, model, body, {}), 413, "payload_too_large")


@pytest.mark.parametrize("body", [b"", b"{", b'{"a": NaN}', b"\xff"], ids=["empty", "cut", "nan", "not-utf8"])
def test_malformed_json_is_an_oip_400(client, model: Model, body):
    assert_oip_error(post_binary(client, model, body, {}), 400, "invalid_json")


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "inputs"),
        ([], 422, None),
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, 422, "inputs[0].name"),
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": ["x"]}]}, 422, "inputs[0].datatype"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["x"]}]}, 422, "inputs[0].shape"),
        (text_input(["x"], shape=[True]), 422, "inputs[0].shape"),
        (text_input(["x", "y"], shape=[1, 2]), 422, "inputs[0].shape"),
        (text_input(["x"], shape=[-1]), 422, "inputs[0].shape"),
        (text_input(["x"], shape=["1"]), 422, "inputs[0].shape"),
        (text_input([["x"]], shape=[1]), 422, "inputs[0].data[0]"),
        (text_input([]), 422, "inputs[0].data"),
        (text_input(["ok", 5]), 422, "inputs[0].data[1]"),
        (text_input(["x"] * 51), 422, "inputs[0].data"),
        ({**text_input(["x"]), "outputs": [{"name": "logits"}]}, 400, "outputs[0].name"),
        ({**text_input(["x"]), "outputs": [{"name": "label"}, {"name": "label"}]}, 400, "outputs[1].name"),
        ({**text_input(["x"]), "outputs": [{"name": ["label"]}]}, 400, "outputs[0].name"),
        ({**text_input(["x"]), "outputs": []}, 400, "outputs"),
        ({**text_input(["x"]), "outputs": {"name": "label"}}, 400, "outputs"),
        ({**text_input(["x"]), "outputs": ["label"]}, 400, "outputs[0]"),
        ({**text_input(["x"]), "outputs": [{"name": "label", "parameters": []}]}, 400, "outputs[0].parameters"),
        (
            {**text_input(["x"]), "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]},
            400,
            "outputs[0].parameters.binary_data",
        ),
        (
            {**text_input(["x"]), "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
            400,
            "outputs[0].parameters.classification",
        ),
        ({**text_input(["x"]), "parameters": {"binary_data_output": 1}}, 400, "parameters.binary_data_output"),
        ({**text_input(["x"]), "parameters": "binary"}, 400, "parameters"),
    ],
)
def test_bad_v2_requests_name_the_field(client, model: Model, body, status, field):
    code = "invalid_input" if status == 422 else "invalid_request"
    assert_oip_error(infer(client, model, body), status, code, field)


@pytest.mark.parametrize("bad_id", ["\ud800", "x" * 257, 7])
def test_an_id_that_cannot_be_echoed_is_422(client, model: Model, bad_id):
    assert_oip_error(infer(client, model, {"id": bad_id, **text_input(["fine"])}), 422, "invalid_input", "id")


def test_errors_outside_v2_keep_the_service_shape(client):
    for path in ("/nope", "/v2x", "/v2nope/models"):
        body = client.simulate_get(path).json
        assert set(body["error"]) == {"code", "message", "field"}, (path, body)


def test_v2_errors_are_counted_by_code(client, model: Model):
    def counted() -> float:
        return REGISTRY.get_sample_value("falcon_input_errors_total", {"code": "invalid_request"}) or 0.0

    before = counted()
    infer(client, model, {**text_input(["x"]), "outputs": [{"name": "logits"}]})
    assert counted() == before + 1


class ExplodingModel:
    """The real model, except that predicting raises: a bug in the model path."""

    def __init__(self, model: Model) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, texts: list[str]) -> list:
        raise RuntimeError("boom")


def test_a_bug_is_an_oip_500(settings: Settings, model: Model):
    app = create_app(settings, ExplodingModel(model), worker_id="test:1")  # type: ignore[arg-type]
    result = infer(falcon.testing.TestClient(app), model, text_input(["good"]))
    assert "boom" not in assert_oip_error(result, 500, "internal_error")


# --- the request log sees v2 inferences -----------------------------------------------------------


class RecordingRequestLog:
    """Our RequestLog's interface, keeping rows in memory."""

    def __init__(self) -> None:
        self.rows: list = []

    def submit(self, row) -> None:
        self.rows.append(row)

    def status(self) -> dict[str, Any]:
        return {}


def test_a_binary_inference_is_logged_like_a_json_one(settings: Settings, model: Model):
    log = RecordingRequestLog()
    app = create_app(settings, model, dependencies=Dependencies(request_log=log), worker_id="test:1")
    body, headers = binary_request(["I adore this phone"], extra={"parameters": {"binary_data_output": True}})
    result = post_binary(falcon.testing.TestClient(app), model, body, headers)
    assert result.status_code == 200, result.text
    (row,) = log.rows
    assert row.route == "/v2/models/{name}/infer" and row.n_texts == 1 and row.text == "I adore this phone"
    assert row.label == expected_outputs(model, ["I adore this phone"])["label"][0]


def test_binary_texts_are_normalised_like_json_ones(settings: Settings, model: Model):
    log = RecordingRequestLog()
    app = create_app(settings, model, dependencies=Dependencies(request_log=log), worker_id="test:1")
    body, headers = binary_request(["\uff47\uff4f\uff4f\uff44  day "])  # fullwidth "good"
    assert post_binary(falcon.testing.TestClient(app), model, body, headers).status_code == 200
    assert [row.text for row in log.rows] == ["good day"]


def test_outputs_are_checked_before_the_texts_are_normalised(client, model: Model, settings: Settings):
    """A request the cheap check refuses must not cost a normalisation first (docs/SECURITY.md)."""
    over_the_raw_bound = "a" * (2 * settings.max_text_chars + 1)
    body = {**text_input([over_the_raw_bound]), "outputs": [{"name": "probabilities"}] * 2}
    assert_oip_error(infer(client, model, body), 400, "invalid_request", "outputs[1].name")


def test_combining_marks_reach_the_model_stream_safe(settings: Settings, model: Model):
    log = RecordingRequestLog()
    app = create_app(settings, model, dependencies=Dependencies(request_log=log), worker_id="test:1")
    marks = "\u0301" * 31 + "\u0316" * 31
    assert infer(falcon.testing.TestClient(app), model, text_input(["a" + marks])).status_code == 200
    (row,) = log.rows
    # A joiner after each 30 marks; NFKC composes a + U+0301 and sorts the marks within each
    # stretch only (U+0316, class 220, before U+0301, class 230).
    assert row.text == "\u00e1" + "\u0301" * 29 + "\u034f" + "\u0316" * 29 + "\u0301" + "\u034f" + "\u0316" * 2


# --- the codec on its own -------------------------------------------------------------------------


def test_split_body_returns_the_header_and_a_view_of_the_rest():
    header, data = split_body(b'{"a":1}\x01\x02', "7")
    assert header == b'{"a":1}' and bytes(data) == b"\x01\x02"
    header, data = split_body(b"{}", " 2 ")
    assert header == b"{}" and len(data) == 0


@pytest.mark.parametrize("value", ["0", "3", "x", "-1", "1.0", "1" * 13, "²"])
def test_split_body_refuses_impossible_lengths(value):
    with pytest.raises(TensorDataError):
        split_body(b"{}", value)


def test_decode_text_tensor_reads_exactly_count_elements():
    data = memoryview(bytes_elements(b"", "é".encode(), b"abc"))
    assert decode_text_tensor(data, 3) == ["", "é", "abc"]
    assert decode_text_tensor(memoryview(b""), 0) == []
    with pytest.raises(TensorDataError, match="follow the 2 elements"):
        decode_text_tensor(data, 2)
    with pytest.raises(TensorDataError, match="ends after 3 of 4"):
        decode_text_tensor(data, 4)


def test_encode_fp64_tensor_is_little_endian_doubles():
    assert encode_fp64_tensor([1.0, -0.5]) == bytes.fromhex("000000000000f03f000000000000e0bf")
    assert encode_fp64_tensor([]) == b""
