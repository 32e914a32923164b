"""What the service tells whom, over real sockets: no password in any output, no internals to the public.

Real `falcon-svc serve` masters (sync workers) on free loopback ports; Redis and
PostgreSQL are free ports with nothing listening, so every client error path
(connect refused, breaker, request-log retries, spool) runs and logs.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_gunicorn_serving import REPO_ROOT, call, free_port, running_service, serve_expecting_exit, service_env

from falcon_svc.startup import EXIT_CONFIG

pytestmark = pytest.mark.integration
SECRET = "Hunter2-s3cret-0f-falcon"


def secret_env(model_dir: Path, port: int, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The service's environment with SECRET as the password of both REDIS_URL and DATABASE_URL (both down)."""
    return service_env(
        model_dir,
        port,
        tmp_path,
        WORKER_CLASS="sync",
        LOG_LEVEL="debug",
        REDIS_URL=f"redis://:{SECRET}@127.0.0.1:{free_port()}/0",
        DATABASE_URL=f"postgresql://falcon:{SECRET}@127.0.0.1:{free_port()}/falcon",
        **extra,
    )


def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `falcon-svc ARGS...`; return its exit code and stdout + stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "falcon_svc.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    return result.returncode, result.stdout + result.stderr


def wait_for_text(path: Path, text: str, within: float = 20.0) -> str:
    """Return the file's text once it contains ``text`` (or once ``within`` seconds passed)."""
    deadline = time.monotonic() + within
    while text not in (content := path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return content


def get_from(source: str, port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on 127.0.0.1:``port`` from the local address ``source``; return (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# --- Finding 3: passwords in logs and output ------------------------------------


def test_no_output_shows_a_url_password(dummy_model_dir, tmp_path):
    port = free_port()
    env = secret_env(dummy_model_dir, port, tmp_path)
    log_path = tmp_path / "service.log"
    with running_service(env, log_path):
        assert call(port, "POST", "/infer", {"text": "the request log has a row to write"})[0] == 200
        # The request-log writer's retries log psycopg's errors: wait for one (synchronisation only).
        wait_for_text(log_path, "retrying PostgreSQL write")
    outputs = {"serve (master, workers, shutdown)": log_path.read_text()}
    for command in (["check"], ["migrate"], ["migrate", "--if-reachable"]):
        outputs[" ".join(command)] = run_cli(env, *command)[1]
    bad_settings = {
        "REDIS_URL": f"http://:{SECRET}@127.0.0.1:1/0",
        "DATABASE_URL": f"mysql://falcon:{SECRET}@127.0.0.1:1/falcon",
        # libpq would quote this password raw: "invalid percent-encoded token".
        "DATABASE_URL ": f"postgresql://falcon:ab%zz{SECRET}@127.0.0.1:1/falcon",
    }
    for key, value in bad_settings.items():
        bad_env = {**env, key.strip(): value}
        returncode, outputs[f"serve with a bad {key}"] = serve_expecting_exit(bad_env)
        assert returncode == EXIT_CONFIG, outputs[f"serve with a bad {key}"]
        returncode, outputs[f"check with a bad {key}"] = run_cli(bad_env, "check")
        assert returncode == EXIT_CONFIG, outputs[f"check with a bad {key}"]

    leaks = {name: output for name, output in outputs.items() if SECRET in output}
    assert not leaks, "the password appears in: " + "; ".join(
        f"{name}: {next(line for line in output.splitlines() if SECRET in line)[:300]}"
        for name, output in leaks.items()
    )
    # Not vacuous: the lines that used to carry the password are there, masked.
    assert "DEGRADED: Redis unreachable at redis://:***@127.0.0.1" in outputs["serve (master, workers, shutdown)"]
    assert "DEGRADED: PostgreSQL unreachable" in outputs["serve (master, workers, shutdown)"]
    assert '"database_url": "postgresql://falcon:***@127.0.0.1:' in outputs["check"], outputs["check"]
    assert "REDIS_URL='http://:***@127.0.0.1:1/0'" in outputs["serve with a bad REDIS_URL"]


# --- Finding 5: internal endpoints ----------------------------------------------


@pytest.fixture(scope="module", params=["sync", "meinheld"])
def default_service(request, dummy_model_dir, tmp_path_factory):
    """A master with the default METRICS_ALLOWED_NETWORKS (loopback); meinheld is what production runs."""
    tmp_path = tmp_path_factory.mktemp("default")
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS=request.param)
    with running_service(env, tmp_path / "service.log"):
        yield port


def test_metrics_are_served_to_loopback_by_default(default_service):
    status, _, body = call(default_service, "GET", "/metrics")
    assert status == 200 and "falcon_http_requests_total" in body, body[:300]


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
def test_metrics_relayed_by_a_proxy_are_a_json_404(default_service, path):
    status, _, body = call(default_service, "GET", path, headers={"X-Forwarded-For": "203.0.113.7"})
    assert status == 404 and body["error"]["code"] == "not_found", body


def test_readyz_detail_goes_to_loopback_status_to_the_relayed(default_service):
    status, _, internal = call(default_service, "GET", "/readyz")
    assert status == 200 and {"model", "dependencies", "degraded", "warnings"} <= set(internal), internal
    status, _, public = call(default_service, "GET", "/readyz", headers={"X-Real-IP": "203.0.113.7"})
    assert status == 200 and public == {"status": "ready"}, public


def test_model_metadata_goes_to_loopback_only(default_service):
    (internal,) = call(default_service, "GET", "/v1/models")[2]["models"]
    assert "metadata" in internal, internal
    (public,) = call(default_service, "GET", "/v1/models", headers={"X-Forwarded-For": "203.0.113.7"})[2]["models"]
    assert set(public) == {"name", "version", "labels", "serving", "active"}, public


def test_metrics_follow_the_peer_address_not_just_loopback(dummy_model_dir, tmp_path):
    """Only 127.0.0.1 allowed: a client connecting from 127.0.0.2 (loopback too) is refused."""
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync", METRICS_ALLOWED_NETWORKS="127.0.0.1/32")
    with running_service(env, tmp_path / "service.log"):
        allowed_status, allowed_body = get_from("127.0.0.1", port, "/metrics")
        refused_status, refused_body = get_from("127.0.0.2", port, "/metrics")
        readyz_status, readyz_body = get_from("127.0.0.2", port, "/readyz")
    assert allowed_status == 200 and "falcon_" in allowed_body, allowed_body[:300]
    assert refused_status == 404 and json.loads(refused_body)["error"]["code"] == "not_found", refused_body[:300]
    assert readyz_status == 200 and json.loads(readyz_body) == {"status": "ready"}, readyz_body


def test_metrics_refused_to_loopback_when_only_a_scrape_network_is_allowed(dummy_model_dir, tmp_path):
    port = free_port()
    env = service_env(dummy_model_dir, port, tmp_path, WORKER_CLASS="sync", METRICS_ALLOWED_NETWORKS="10.0.0.0/8")
    with running_service(env, tmp_path / "service.log"):
        status, _, body = call(port, "GET", "/metrics")
    assert status == 404 and body["error"]["code"] == "not_found", body
