"""A real gunicorn master (`falcon-svc serve`) with MODEL_PUBLIC_KEY: signed models only (finding 13).

The tampered artifact here is what an attacker who can write the model directory
would leave: a model file that runs code when unpickled (it creates a marker
directory) and a metadata.json whose sha256 matches it. The service must refuse it
at start and on a SIGHUP reload, with exit 66 and one line naming the signature file
and the trusted key, and the payload must never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import joblib
import pytest
from test_gunicorn_serving import call, free_port, running_service, serve_expecting_exit, service_env

from falcon_svc.model.artifact import METADATA_FILE, MODEL_FILE, staging_directory
from falcon_svc.model.signing import generate_keypair, load_private_key, load_public_key, sign_artifact
from falcon_svc.startup import EXIT_NO_MODEL

pytestmark = pytest.mark.integration


class WritesAFileWhenUnpickled:
    """Loading this pickle creates ``marker``: a stand-in for a malicious model."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def signed(dummy_model_dir: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """Return (a signed copy of the dummy model, its public key file, the key id)."""
    private, public = generate_keypair(tmp_path / "keys")
    artifact = Path(shutil.copytree(dummy_model_dir, tmp_path / "model"))
    sign_artifact(artifact, load_private_key(private))
    return artifact, public, load_public_key(public).key_id


def plant_payload(artifact: Path, marker: Path) -> None:
    """Swap in a code-running model file and a metadata whose sha256 matches it; keep the signature."""
    joblib.dump(WritesAFileWhenUnpickled(marker), artifact / MODEL_FILE)
    metadata = json.loads((artifact / METADATA_FILE).read_text())
    metadata["sha256"] = hashlib.sha256((artifact / MODEL_FILE).read_bytes()).hexdigest()
    (artifact / METADATA_FILE).write_text(json.dumps(metadata))


def test_serves_a_signed_model_and_says_which_key_verified_it(signed, tmp_path):
    artifact, public, key_id = signed
    port, log_path = free_port(), tmp_path / "service.log"
    env = service_env(artifact, port, tmp_path, WORKER_CLASS="sync", MODEL_PUBLIC_KEY=str(public))
    with running_service(env, log_path):
        status, _, body = call(port, "POST", "/infer", {"text": "signed and served"})
        assert status == 200, body
    log = log_path.read_text()
    assert f"signature verified with key {key_id}" in log, log[-2000:]
    assert "not authenticated" not in log


def test_refuses_to_start_with_a_tampered_signed_model(signed, tmp_path):
    artifact, public, key_id = signed
    marker = tmp_path / "payload-ran"
    plant_payload(artifact, marker)
    env = service_env(artifact, free_port(), tmp_path, WORKER_CLASS="sync", MODEL_PUBLIC_KEY=str(public))
    returncode, output = serve_expecting_exit(env)
    assert returncode == EXIT_NO_MODEL, output
    (line,) = [line for line in output.splitlines() if "cannot load the model" in line]
    assert f"{artifact / 'signature.json'} does not verify" in line and key_id in line, line
    assert not marker.exists(), "the tampered model was unpickled before its signature was checked"


def test_a_reload_refuses_a_model_tampered_after_start(signed, tmp_path):
    """SIGHUP boots new workers, and each one verifies the artifact again before loading it."""
    artifact, public, key_id = signed
    marker = tmp_path / "payload-ran"
    port, log_path = free_port(), tmp_path / "service.log"
    env = service_env(artifact, port, tmp_path, WORKER_CLASS="sync", WORKERS="1", MODEL_PUBLIC_KEY=str(public))
    with running_service(env, log_path) as master:
        plant_payload(artifact, marker)
        master.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "does not verify" not in log_path.read_text():
            assert time.monotonic() < deadline, f"no refusal after SIGHUP in 60 s: {log_path.read_text()[-3000:]}"
            time.sleep(0.1)
    refusals = [line for line in log_path.read_text().splitlines() if "does not verify" in line]
    assert key_id in refusals[0], refusals[0]
    assert not marker.exists(), "a reloaded worker unpickled the tampered model"


def test_workers_booted_after_a_swap_load_the_new_signed_model(signed, tmp_path):
    """`model sign --publish` (what the role runs for a shipped model) swaps a signed model in under a live master.

    The master keeps running across the directory exchange; the workers SIGHUP boots
    verify and serve the new artifact, and none exits 66.
    """
    artifact, public, _ = signed
    staged = staging_directory(artifact)
    for name in (METADATA_FILE, MODEL_FILE):
        shutil.copy(artifact / name, staged / name)
    metadata = json.loads((staged / METADATA_FILE).read_text())
    (staged / METADATA_FILE).write_text(json.dumps({**metadata, "version": "shipped-2"}))
    port, log_path = free_port(), tmp_path / "service.log"
    env = service_env(artifact, port, tmp_path, WORKER_CLASS="sync", WORKERS="1", MODEL_PUBLIC_KEY=str(public))
    with running_service(env, log_path) as master:
        assert call(port, "GET", "/v1/models")[2]["models"][0]["version"] == metadata["version"]
        sign = subprocess.run(
            [sys.executable, "-m", "falcon_svc.cli", "model", "sign", str(staged),
             "--key", str(tmp_path / "keys" / "model-signing.key"), "--publish", str(artifact)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sign.returncode == 0, sign.stderr
        master.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while call(port, "GET", "/v1/models")[2]["models"][0]["version"] != "shipped-2":
            assert time.monotonic() < deadline, (
                f"the new model was not served 60 s after SIGHUP: {log_path.read_text()[-3000:]}"
            )
            time.sleep(0.2)
        status, _, body = call(port, "POST", "/infer", {"text": "swapped in and served"})
        assert status == 200, body
    assert "cannot load the model" not in log_path.read_text()
