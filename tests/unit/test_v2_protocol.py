"""Open Inference Protocol v2: what standard clients send and expect."""

from __future__ import annotations

import json

import pytest

from falcon_svc.model import Model

JSON = {"Content-Type": "application/json"}


def infer(client, model: Model, body: object, name: str | None = None):
    return client.simulate_post(f"/v2/models/{name or model.name}/infer", body=json.dumps(body), headers=JSON)


def text_input(texts: list, shape: list | None = None) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}]}


def test_server_metadata_and_health(client):
    assert client.simulate_get("/v2").json["name"] == "falcon-svc"
    assert client.simulate_get("/v2/health/live").json == {"live": True}
    assert client.simulate_get("/v2/health/ready").json == {"ready": True}


def test_model_metadata_names_tensors(client, model: Model):
    body = client.simulate_get(f"/v2/models/{model.name}").json
    assert body["name"] == model.name and body["versions"] == [model.version]
    assert body["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [output["name"] for output in body["outputs"]] == ["label", "confidence", "probabilities"]
    assert client.simulate_get(f"/v2/models/{model.name}/ready").json == {"ready": True}


def test_infer_returns_tensors_matching_the_model(client, model: Model):
    texts = ["I adore this phone", "The screen cracked on day one"]
    result = infer(client, model, {"id": "req-7", **text_input(texts)})
    assert result.status_code == 200, result.text
    body = result.json
    assert body["model_name"] == model.name and body["model_version"] == model.version and body["id"] == "req-7"
    outputs = {output["name"]: output for output in body["outputs"]}
    expected = model.predict(texts)
    assert outputs["label"]["data"] == [p.label for p in expected]
    assert outputs["probabilities"]["shape"] == [2, len(model.labels)]
    flat = [p.probabilities[label] for p in expected for label in model.labels]
    assert outputs["probabilities"]["data"] == pytest.approx(flat, abs=1e-12)
    assert outputs["confidence"]["data"] == pytest.approx([p.confidence for p in expected], abs=1e-12)


def test_infer_accepts_column_vector_and_output_selection(client, model: Model):
    body = {**text_input([["good"], ["bad"]], shape=[2, 1]), "outputs": [{"name": "label"}]}
    result = infer(client, model, body)
    assert result.status_code == 200, result.text
    assert [output["name"] for output in result.json["outputs"]] == ["label"]


def test_unknown_model_is_404(client, model: Model):
    result = infer(client, model, text_input(["x"]), name="other")
    assert result.status_code == 404 and result.json["error"]["code"] == "model_not_found"
    assert client.simulate_get("/v2/models/other").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, "inputs[0].name"),
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": ["x"]}]}, "inputs[0].datatype"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["x"]}]}, "inputs[0].shape"),
        (text_input([]), "inputs[0].data"),
        (text_input(["ok", 5]), "inputs[0].data[1]"),
        (text_input(["x"] * 51), "inputs[0].data"),
        ({**text_input(["x"]), "outputs": [{"name": "logits"}]}, "outputs"),
    ],
)
def test_bad_v2_requests_are_422_naming_the_field(client, model: Model, body, field):
    result = infer(client, model, body)
    assert result.status_code == 422, result.text
    assert result.json["error"]["field"] == field


@pytest.mark.parametrize("bad_id", ["\ud800", "x" * 257, 7])
def test_an_id_that_cannot_be_echoed_is_422(client, model: Model, bad_id):
    body = json.dumps({"id": bad_id, **text_input(["fine"])})
    result = client.simulate_post(f"/v2/models/{model.name}/infer", body=body, headers=JSON)
    assert result.status_code == 422, result.text
    assert result.json["error"]["field"] == "id"
