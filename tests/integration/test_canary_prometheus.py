"""`falcon-svc models canary` against real servers: two gunicorn masters serving from one
model store, a real Prometheus scraping them every second, and steady traffic on both.

systemd is not here, so the reload hook sends SIGHUP to the unit's gunicorn master, which
is what `systemctl reload falcon-worker@P` does (ExecReload=/bin/kill -s HUP $MAINPID).
The traffic counts every request that is not a 200: a canary, promoted or rolled back,
must not fail one.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from servers import free_port, stop_process
from test_gunicorn_serving import call, running_service, service_env
from tools import require_tool

from falcon_svc.canary import Hooks, Limits, Plan, prometheus_query, report, run_canary
from falcon_svc.model.store import ModelStore
from falcon_svc.rollout import served_version
from falcon_svc.training import train_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW_SECONDS = 10
# Enough for the decision to rest on traffic, few enough for a slow shared machine:
# the traffic below sends tens of requests a second to each unit.
# The latency check is relaxed: on a shared 2-core machine a 10 s p99 is noise, and the
# latency rule itself is proven with numbers in tests/unit/test_canary.py.
LIMITS = Limits(min_requests=40, max_p99_ratio=10.0, p99_slack_seconds=1.0)

SUBJECTS = ["The delivery", "The support team", "The hotel room", "My order", "The app", "The battery"]
PHRASES = {
    "positive": ["was wonderful", "was excellent, thank you", "made me happy", "is great value"],
    "negative": ["was terrible", "broke after a day, awful", "made me angry", "is a waste of money"],
    "neutral": ["arrived on Tuesday", "is blue", "has two buttons", "was delivered to the office"],
}
# What the traffic says: other subjects than the training rows, every phrase.
TRAFFIC_SUBJECTS = ["The coffee", "Our new sofa", "The train ride", "This book", "The concert", "The hotel bar"]
TRAFFIC_TEXTS = [
    f"{subject} {phrase}" for subject in TRAFFIC_SUBJECTS for group in PHRASES.values() for phrase in group
]


def training_rows(subjects: list[str]) -> list[tuple[str, str]]:
    return [(f"{s} {p}.", label) for label, phrases in PHRASES.items() for s in subjects for p in phrases]


def collapsed_rows() -> list[tuple[str, str]]:
    """Every real row labelled negative, plus the few nonsense rows training needs per label."""
    rows = [(text, "negative") for text, _ in training_rows(SUBJECTS)]
    return rows + [(f"zq{i} xv{i}", label) for label in ("positive", "neutral") for i in range(5)]


def train(directory: Path, rows: list[tuple[str, str]]) -> Path:
    data = directory.with_suffix(".csv")
    data.write_text("text,label\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_cli.main(["--data", str(data), "--output-dir", str(directory)]) == 0
    return directory


@dataclass
class Stack:
    store: ModelStore
    masters: dict[int, subprocess.Popen]  # port -> the unit's gunicorn master
    prometheus_url: str
    versions: dict[str, str]  # "v1", "v2", "collapsed" -> the stored version
    failures: list[str]

    @property
    def ports(self) -> list[int]:
        return list(self.masters)

    def hooks(self, said: list[str]) -> Hooks:
        def sighup(port: int) -> None:
            os.kill(self.masters[port].pid, signal.SIGHUP)

        return Hooks(
            reload=sighup, query=prometheus_query(self.prometheus_url), say=said.append, ready_timeout_seconds=90
        )


@contextmanager
def running_prometheus(directory: Path, targets: list[str]) -> Iterator[str]:
    """Run Prometheus scraping the units every second as job "falcon"; yield its URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "falcon", "static_configs": [{"targets": targets}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = directory / "prometheus.log"
    args = [
        require_tool("prometheus", "prometheus"),
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while not _answers(f"{url}/-/ready"):
                assert process.poll() is None, f"prometheus exited: {log_path.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"prometheus not ready in 30 s: {log_path.read_text()[-2000:]}"
                time.sleep(0.2)
            yield url
        finally:
            stop_process(process, timeout=15)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def drive_traffic(ports: list[int], stop: threading.Event, failures: list[str]) -> None:
    """Post varied texts to every unit in turn until told to stop; record every answer that is not 200.

    Each text carries a counter, so no answer comes from a cache and every one is a prediction.
    """
    i = 0
    while not stop.is_set():
        for port in ports:
            i += 1
            text = f"{TRAFFIC_TEXTS[i % len(TRAFFIC_TEXTS)]} (visit {i})"
            try:
                status, _, body = call(port, "POST", "/infer", {"text": text})
            except OSError as ex:
                failures.append(f"port {port} request {i}: {ex!r}")
                continue
            if status != 200:
                failures.append(f"port {port} request {i}: {status} {body}")
        stop.wait(0.01)


def wait_for_scrapes(prometheus_url: str, ports: list[int]) -> None:
    """Wait until Prometheus has inference traffic of both units (the window must not start blind)."""
    query = prometheus_query(prometheus_url)
    deadline = time.monotonic() + 60
    while True:
        seen = query('sum by (instance) (falcon_http_requests_total{route="/infer"})', time.time())
        if len(seen) == len(ports):
            return
        assert time.monotonic() < deadline, f"Prometheus has no /infer series of every unit: {seen}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Train three versions into a store (v1 active), start two units, Prometheus and the traffic."""
    tmp = tmp_path_factory.mktemp("canary")
    store = ModelStore(tmp / "store")
    trained = {
        "v1": train(tmp / "v1", training_rows(SUBJECTS)),
        # Another good model: the same kind of data with two more subjects.
        "v2": train(tmp / "v2", training_rows([*SUBJECTS, "The parcel", "The waiter"])),
        "collapsed": train(tmp / "collapsed", collapsed_rows()),
    }
    versions = {name: store.import_artifact(path) for name, path in trained.items()}
    assert len(set(versions.values())) == 3, f"the three models must be three versions: {versions}"
    store.activate(versions["v1"], reason="test: the starting version")

    failures: list[str] = []
    with ExitStack() as stack:
        masters = {}
        for port in (free_port(), free_port()):
            unit_dir = tmp / f"unit-{port}"
            unit_dir.mkdir()
            env = service_env(
                trained["v1"], port, unit_dir,
                MODEL_STORE=str(store.root), CACHE_ENABLED="false", REQUEST_LOG_ENABLED="false",
            )  # fmt: skip
            masters[port] = stack.enter_context(running_service(env, unit_dir / "service.log"))
        (tmp / "prometheus").mkdir()
        url = stack.enter_context(running_prometheus(tmp / "prometheus", [f"127.0.0.1:{port}" for port in masters]))
        stop = threading.Event()
        # NOTE: a thread per unit, so one slow answer does not starve the other unit's count.
        for port in masters:
            traffic = threading.Thread(target=drive_traffic, args=([port], stop, failures), daemon=True)
            traffic.start()
            stack.callback(traffic.join, 15)
        stack.callback(stop.set)
        wait_for_scrapes(url, list(masters))
        yield Stack(store, masters, url, versions, failures)


def fake_systemctl(directory: Path, masters: dict[int, subprocess.Popen]) -> Path:
    """A ``systemctl`` whose ``reload falcon-worker@P.service`` does what the unit's ExecReload does: HUP the master."""
    directory.mkdir(exist_ok=True)
    cases = "\n".join(f"  'reload falcon-worker@{port}.service') kill -HUP {m.pid} ;;" for port, m in masters.items())
    script = directory / "systemctl"
    script.write_text(f'#!/bin/sh\ncase "$*" in\n{cases}\n  *) echo "unexpected: $*" >&2; exit 1 ;;\nesac\n')
    script.chmod(0o755)
    return directory


def models_command(stack: Stack, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `falcon-svc models --store STORE ...` as Ansible runs it on a host, systemctl faked."""
    env = {**os.environ, "PATH": f"{fake_systemctl(tmp_path / 'bin', stack.masters)}:{os.environ['PATH']}"}
    env.pop("MODEL_STORE", None)
    argv = [sys.executable, "-m", "falcon_svc.cli", "models", "--store", str(stack.store.root)]
    argv += ["--env-file", str(tmp_path / "no-env-file"), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_the_gate_refuses_a_collapsed_version_before_any_unit_serves_it(stack: Stack, tmp_path: Path) -> None:
    active, history = stack.store.active(), len(stack.store.history())
    ports = ",".join(map(str, stack.ports))
    result = models_command(
        stack, tmp_path, "canary", stack.versions["collapsed"], "--ports", ports,
        "--prometheus", stack.prometheus_url, "--window", str(WINDOW_SECONDS),
    )  # fmt: skip
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "NOT ROLLED OUT" in result.stdout and "gate: " in result.stdout, result.stdout
    assert len(stack.store.history()) == history, "a refused version must change nothing"
    assert {port: served_version(port) for port in stack.ports} == dict.fromkeys(stack.ports, active)


def test_a_forced_collapsed_version_is_rolled_back_on_its_label_mix(stack: Stack, tmp_path: Path) -> None:
    active = stack.store.active()
    bad = stack.versions["collapsed"]
    canary_port, other_port = stack.ports
    result = models_command(
        stack, tmp_path, "canary", bad, "--ports", f"{canary_port},{other_port}",
        "--prometheus", stack.prometheus_url, "--window", str(WINDOW_SECONDS),
        "--min-requests", str(LIMITS.min_requests), "--max-p99-ratio", str(LIMITS.max_p99_ratio),
        "--p99-slack-ms", str(LIMITS.p99_slack_seconds * 1000), "--force", "--reason", "test: deliberately bad",
    )  # fmt: skip
    print(result.stdout)  # the evidence, in the test's output
    assert result.returncode == 1, f"exit {result.returncode}: it was not rolled back\n{result.stdout}\n{result.stderr}"
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines() if line.endswith((" ok", " FAIL"))}
    assert rows["predicted-label mix"].endswith("FAIL"), f"it should fail on its label mix:\n{result.stdout}"
    assert f"decision: ROLLED BACK {bad}: label mix shifted" in result.stdout, result.stdout
    assert stack.store.active() == active and stack.store.pins() == {}
    assert {port: served_version(port) for port in stack.ports} == dict.fromkeys(stack.ports, active)
    actions = [(entry["action"], entry.get("to") or entry.get("source")) for entry in stack.store.history()[-2:]]
    assert actions == [("pin", bad), ("unpin", bad)], stack.store.history()
    assert stack.failures == [], f"requests failed during the canary: {stack.failures[:5]}"


def test_a_good_version_is_promoted_and_served_by_every_unit(stack: Stack) -> None:
    old, good = stack.store.active(), stack.versions["v2"]
    assert old != good
    canary_port, other_port = stack.ports
    said: list[str] = []
    plan = Plan(good, canary_port, (other_port,), WINDOW_SECONDS, LIMITS)
    outcome = run_canary(stack.store, plan, stack.hooks(said))
    report(outcome, plan)

    assert outcome.promoted, f"the good version was rolled back: {outcome.summary}\n{said}"
    assert stack.store.active() == good and stack.store.previous() == old and stack.store.pins() == {}
    assert {port: served_version(port) for port in stack.ports} == dict.fromkeys(stack.ports, good)
    status, _, body = call(other_port, "POST", "/infer", {"text": "The coffee was wonderful"})
    assert status == 200 and body["model_version"] == good, body
    assert stack.failures == [], f"requests failed during the canary: {stack.failures[:5]}"
