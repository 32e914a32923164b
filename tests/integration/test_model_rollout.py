"""Activate and roll back a model version on a running service under load: 0 failed requests.

A real `falcon-svc serve` (gunicorn, the default worker class) serves from a model
store; `falcon-svc models activate` swaps the pointer and a HUP (what `systemctl
reload` sends) makes new workers load it while the old ones finish their requests.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from closed_loop import ClosedLoop
from test_gunicorn_serving import call, free_port, running_service, service_env
from toy_models import labelled_rows, train_toy

from falcon_svc import cli
from falcon_svc.model.store import ModelStore
from falcon_svc.rollout import wait_serving

TEXTS = ["The delivery was wonderful.", "The app broke after a day, awful.", "My order arrived on Tuesday."]


class Load(ClosedLoop):
    """Threads posting /infer until stopped; every answer's status and model_version counted."""

    def __init__(self, port: int, threads: int = 4) -> None:
        super().__init__(threads)
        self.port = port
        self.statuses: Counter[int | str] = Counter()
        self.versions: Counter[str] = Counter()

    def wait_for(self, version: str, answers: int, within: float = 60.0) -> None:
        """Wait until the load has had ``answers`` answers from ``version`` in all."""
        deadline = time.monotonic() + within
        while self.versions[version] < answers:
            assert time.monotonic() < deadline, f"only {self.versions[version]} answers from {version}: {self.statuses}"
            time.sleep(0.05)

    def send_one(self, client: int, count: int) -> None:
        text = f"{TEXTS[count % len(TEXTS)]} ({client}-{count})"
        try:
            status, _, body = call(self.port, "POST", "/infer", {"text": text}, timeout=30)
        except OSError as ex:  # NOTE: a refused or reset connection is a failed request too
            status, body = f"error: {ex}", None
        with self._lock:
            self.statuses[status] += 1
            if status == 200:
                self.versions[body["model_version"]] += 1


def models(store: Path, *args: str) -> int:
    return cli.main(["models", "--store", str(store), "--env-file", "/nonexistent", *args])


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, str]:
    rows = labelled_rows()
    first, second = train_toy(tmp_path, "first", rows), train_toy(tmp_path, "second", list(reversed(rows)))
    root = tmp_path / "store"
    models_store = ModelStore(root)
    old, new = models_store.import_artifact(first), models_store.import_artifact(second)
    assert old != new
    models_store.activate(old)
    # NOTE: toy models: the behavioural floor is not what this test is about.
    monkeypatch.setenv("MODEL_BEHAVIOUR_FLOOR_PERCENT", "0")
    monkeypatch.setenv("MODEL_GATE_TOLERANCE_POINTS", "100")
    return root, old, new


def test_activate_and_rollback_under_load_fail_no_request(store, tmp_path: Path) -> None:
    root, old, new = store
    port = free_port()
    env = service_env(tmp_path / "unused", port, tmp_path, MODEL_STORE=str(root))
    with running_service(env, tmp_path / "serve.log") as process, Load(port) as load:
        wait_serving(port, old, within=30)
        assert models(root, "activate", new, "--reason", "test") == 0
        os.kill(process.pid, signal.SIGHUP)  # what `systemctl reload falcon-worker@PORT` sends
        wait_serving(port, new, within=60)
        # The previous version stays loaded: a client may still name it.
        status, _, body = call(
            port,
            "POST",
            f"/v2/models/sentiment/versions/{old}/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["It was wonderful."]}]},
        )
        assert status == 200 and body["model_version"] == old, body
        status, _, listed = call(port, "GET", "/v1/models")
        roles = {entry["version"]: (entry["serving"], entry["active"]) for entry in listed["models"]}
        assert roles == {new: (True, True), old: (False, False)}, listed
        load.wait_for(new, 20)  # the load itself gets answers from the new version

        assert models(root, "rollback", "--reason", "test") == 0
        os.kill(process.pid, signal.SIGHUP)
        wait_serving(port, old, within=60)
        status, _, body = call(port, "POST", "/infer", {"text": "It was wonderful."})
        assert status == 200 and body["model_version"] == old, body
        old_before = load.versions[old]
        load.wait_for(old, old_before + 20)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert set(load.statuses) == {200}, f"failed requests during the switch: {load.statuses}\n{log[-3000:]}"
    assert load.versions[new] >= 20 and load.versions[old] >= 20, load.versions


def test_a_worker_without_an_active_version_exits_66(tmp_path: Path) -> None:
    from test_gunicorn_serving import serve_expecting_exit

    env = service_env(tmp_path / "unused", free_port(), tmp_path, MODEL_STORE=str(tmp_path / "empty-store"))
    code, output = serve_expecting_exit(env)
    assert code == 66 and "has no active version" in output, output
