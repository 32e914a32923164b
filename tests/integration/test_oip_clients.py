"""Open Inference Protocol v2 with the standard client: tritonclient.http against real gunicorn masters.

One service per worker class (sync, meinheld), shared by the module's tests.
tritonclient sends no Content-Type and, by default, binary tensors both ways,
so these tests prove what in-process tests cannot: that real clients and real
servers (gunicorn's and meinheld's HTTP parsers) agree with us on the wire.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from test_gunicorn_serving import free_port, running_service, service_env
from tritonclient.utils import InferenceServerException

from falcon_svc.model import Model

pytestmark = pytest.mark.integration

TEXTS = ["I adore this phone", "The screen cracked on day one", "naïve café, ☕ fine"]
HEADER_LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module", params=["sync", "meinheld"])
def port(request, dummy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A `falcon-svc serve` master with the given worker class, for the whole module."""
    tmp_path = tmp_path_factory.mktemp(f"oip-{request.param}")
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS=request.param)
    log_path = tmp_path / "service.log"
    with running_service(env, log_path):
        # gunicorn may swap a worker class silently (sync becomes gthread with threads): check what serves.
        used = [line for line in log_path.read_text().splitlines() if "Using worker: " in line]
        assert len(used) == 1 and request.param in used[0].lower(), used
        yield port


@pytest.fixture
def client(port: int) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=30.0)
    yield client
    client.close()


def text_input(texts: list[str], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def as_texts(array: np.ndarray) -> list[str]:
    """tritonclient gives BYTES as bytes when binary and as str when JSON; compare texts."""
    return [item.decode() if isinstance(item, bytes) else item for item in array.tolist()]


def assert_matches_model(result: triton.InferResult, model: Model, texts: list[str], names: tuple[str, ...]) -> None:
    predictions = model.predict(texts)
    present = [output["name"] for output in result.get_response()["outputs"]]
    assert present == list(names), present
    if "label" in names:
        assert as_texts(result.as_numpy("label")) == [p.label for p in predictions]
    if "confidence" in names:
        confidence = result.as_numpy("confidence")
        assert confidence.dtype == np.float64 and confidence.shape == (len(texts),)
        assert confidence.tolist() == pytest.approx([p.confidence for p in predictions], abs=1e-12)
    if "probabilities" in names:
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (len(texts), len(model.labels))
        expected = [p.probabilities[label] for p in predictions for label in model.labels]
        assert probabilities.ravel().tolist() == pytest.approx(expected, abs=1e-12)


def test_json_inference(client, model: Model):
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("label", "confidence")]
    result = client.infer(model.name, [text_input(TEXTS, binary=False)], outputs=outputs, request_id="req-1")
    assert result.get_response()["id"] == "req-1"
    assert all("data" in output for output in result.get_response()["outputs"])
    assert_matches_model(result, model, TEXTS, ("label", "confidence"))


def test_binary_inputs_and_outputs(client, model: Model):
    names = ("label", "confidence", "probabilities")
    outputs = [triton.InferRequestedOutput(name, binary_data=True) for name in names]
    result = client.infer(model.name, [text_input(TEXTS, binary=True)], outputs=outputs)
    assert all("binary_data_size" in output["parameters"] for output in result.get_response()["outputs"])
    assert_matches_model(result, model, TEXTS, names)


def test_binary_data_output_when_no_outputs_are_named(client, model: Model):
    # NOTE: tritonclient asks with parameters.binary_data_output when no outputs are given.
    result = client.infer(model.name, [text_input(TEXTS, binary=False)])
    assert all("data" not in output for output in result.get_response()["outputs"])
    assert_matches_model(result, model, TEXTS, ("label", "confidence", "probabilities"))


def test_a_subset_of_outputs_on_the_versioned_route(client, model: Model):
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=True)]
    result = client.infer(
        model.name, [text_input(TEXTS[:1], binary=True)], outputs=outputs, model_version=model.version
    )
    assert result.get_response()["model_version"] == model.version
    assert_matches_model(result, model, TEXTS[:1], ("probabilities",))


@pytest.mark.parametrize(
    ("model_name", "texts", "status", "message"),
    [
        ("nope", ["fine"], "404", "No model named 'nope'; this server serves "),
        (None, ["fine", "   "], "422", "'inputs[0].data[1]' is empty or only whitespace."),
    ],
)
def test_errors_reach_the_client_as_our_message(client, model: Model, model_name, texts, status, message):
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model_name or model.name, [text_input(texts, binary=True)])
    assert raised.value.status() == status, str(raised.value)
    assert raised.value.message().startswith(message), raised.value.message()


def test_metadata_and_readiness(client, model: Model):
    server = client.get_server_metadata()
    assert server["name"] == "falcon-svc" and "binary_tensor_data" in server["extensions"]
    assert client.is_server_live() and client.is_server_ready()
    for version in ("", model.version):
        metadata = client.get_model_metadata(model.name, model_version=version)
        assert metadata["versions"] == [model.version] and metadata["inputs"][0]["name"] == "text"
        assert client.is_model_ready(model.name, model_version=version)
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready(model.name, model_version="no-such-version")
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata(model.name, model_version="no-such-version")
    assert raised.value.status() == "404" and "no-such-version" in raised.value.message()


# --- the wire, byte by byte -----------------------------------------------------------------------


def raw_request(port: int, head: str, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send one hand-written HTTP/1.1 request; return (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.headers, response.read()


def binary_body(texts: list[str], extra: bytes = b"") -> tuple[bytes, int]:
    data = b"".join(struct.pack("<I", len(raw)) + raw for raw in (text.encode() for text in texts)) + extra
    tensor = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "parameters": {"binary_data_size": len(data)}}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + data, len(header)


def test_a_wrong_content_type_is_an_oip_415(port: int, model: Model):
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model.name}/infer", data=body)
    request.add_header("Content-Type", "text/plain")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    reply = json.loads(raised.value.read())
    assert raised.value.code == 415 and isinstance(reply["error"], str), reply
    assert reply["code"] == "unsupported_media_type" and "text/plain" in reply["error"], reply


def test_a_malformed_binary_body_is_an_oip_400(port: int, model: Model):
    body, header_length = binary_body(["good"], extra=b"\x00\x00")
    status, headers, raw = raw_request(
        port,
        f"POST /v2/models/{model.name}/infer HTTP/1.1\nHost: t\nConnection: close\n"
        f"{HEADER_LENGTH}: {header_length}\nContent-Length: {len(body)}\n",
        body,
    )
    reply = json.loads(raw)
    assert status == 400 and headers["Content-Type"].startswith("application/json"), (status, raw)
    assert reply["error"] == "2 bytes follow the 1 elements the shape declares in the BYTES data.", reply
    assert reply["code"] == "invalid_request" and reply["field"] == "inputs[0].data", reply


def test_a_chunked_binary_body_without_content_type(port: int, model: Model):
    body, header_length = binary_body(TEXTS)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:])) + b"0\r\n\r\n"
    status, headers, raw = raw_request(
        port,
        f"POST /v2/models/{model.name}/infer HTTP/1.1\nHost: t\nConnection: close\n"
        f"{HEADER_LENGTH}: {header_length}\nTransfer-Encoding: chunked\n",
        chunks,
    )
    assert status == 200, raw
    assert headers["Content-Type"] == "application/octet-stream", headers
    result = triton.InferResult.from_response_body(raw, header_length=int(headers[HEADER_LENGTH]))
    assert as_texts(result.as_numpy("label")) == [p.label for p in model.predict(TEXTS)]
