"""One worker, several loaded versions: the served one by default, the others when a client names them."""

from __future__ import annotations

import falcon.testing
import pytest
from toy_models import labelled_rows, train_toy

from falcon_svc import metrics
from falcon_svc.app import create_app
from falcon_svc.model import Model, load_model
from falcon_svc.settings import Settings


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return load_model(train_toy(tmp_path_factory.mktemp("other"), "other", labelled_rows()))


@pytest.fixture
def client(settings: Settings, model: Model, other: Model) -> falcon.testing.TestClient:
    app = create_app(settings, model, worker_id="test:1", other_versions={other.version: other}, active_version=None)
    return falcon.testing.TestClient(app)


def infer_body(text: str) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def test_unversioned_routes_serve_the_served_version(client, model: Model) -> None:
    assert client.simulate_post("/infer", json={"text": "It was wonderful."}).json["model_version"] == model.version
    reply = client.simulate_post("/v2/models/sentiment/infer", json=infer_body("It was wonderful."))
    assert reply.json["model_version"] == model.version, reply.text


def test_a_named_version_answers_with_that_version(client, other: Model) -> None:
    reply = client.simulate_post(f"/v2/models/sentiment/versions/{other.version}/infer", json=infer_body("wonderful"))
    assert reply.status_code == 200 and reply.json["model_version"] == other.version, reply.text
    assert client.simulate_get(f"/v2/models/sentiment/versions/{other.version}/ready").status_code == 200


def test_an_unloaded_version_is_a_404_naming_the_loaded_ones(client, model: Model, other: Model) -> None:
    reply = client.simulate_post("/v2/models/sentiment/versions/2020.01.01-00000000/infer", json=infer_body("x"))
    assert reply.status_code == 404, reply.text
    assert model.version in reply.json["error"] and other.version in reply.json["error"], reply.json


def test_metadata_and_model_list_name_every_version_and_their_roles(client, model: Model, other: Model) -> None:
    metadata = client.simulate_get("/v2/models/sentiment").json
    assert metadata["versions"] == [model.version, other.version], metadata
    assert metadata["parameters"]["serving_version"] == model.version == metadata["parameters"]["active_version"]
    entries = client.simulate_get("/v1/models", remote_addr="198.51.100.9").json["models"]
    assert [(entry["version"], entry["serving"], entry["active"]) for entry in entries] == [
        (model.version, True, True),
        (other.version, False, False),
    ]


def test_predictions_are_counted_by_the_version_that_made_them(client, other: Model) -> None:
    def count() -> float:
        value = 0.0
        for family in metrics.PREDICTIONS.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("version") == other.version:
                    value += sample.value
        return value

    before = count()
    client.simulate_post(f"/v2/models/sentiment/versions/{other.version}/infer", json=infer_body("It was awful."))
    assert count() == before + 1
