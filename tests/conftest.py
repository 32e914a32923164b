"""Shared fixtures: a small real model and the app built around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import falcon
import falcon.testing
import pytest

from falcon_svc.app import create_app
from falcon_svc.lifecycle import Lifecycle
from falcon_svc.model import Model, load_model
from falcon_svc.settings import Settings
from falcon_svc.training import build_dummy_model

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dummy_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) trained artifact: the HTTP layer does not need the full model."""
    directory = tmp_path_factory.mktemp("model")
    build_dummy_model(directory)
    return directory


@pytest.fixture(scope="session")
def model(dummy_model_dir: Path) -> Model:
    return load_model(dummy_model_dir)


@pytest.fixture
def settings(dummy_model_dir: Path) -> Settings:
    return Settings(model_dir=dummy_model_dir, instance_name="test", access_log="off")


@pytest.fixture
def lifecycle() -> Lifecycle:
    return Lifecycle()


@pytest.fixture
def app(settings: Settings, model: Model, lifecycle: Lifecycle) -> falcon.App:
    return create_app(settings, model, lifecycle=lifecycle, worker_id="test:1")


@pytest.fixture
def client(app: falcon.App) -> Iterator[falcon.testing.TestClient]:
    yield falcon.testing.TestClient(app)
