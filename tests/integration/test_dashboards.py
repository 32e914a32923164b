"""Every Grafana panel query and every recording rule, run against a real Prometheus.

One Prometheus (scraping every second) scrapes a real falcon-svc under gunicorn,
with real Redis and PostgreSQL behind it, and a real node-exporter, while a
background thread drives mixed traffic (misses, cache hits, batches, 4xx). A
query that names a metric or label the service does not export, or that is not
valid PromQL, comes back empty or as an error, and its panel is named in the
failure. Grafana itself is not needed: its variables are substituted the way it
would expand them with "All" selected.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from servers import PostgresServer, RedisServer, free_port, stop_process, wait_for_port
from test_gunicorn_serving import call, running_service, service_env
from tools import require_tool

from falcon_svc.requestlog.migrate import apply_migrations

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO_ROOT / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((REPO_ROOT / "prometheus" / "rules").glob("*.yml"))

# Grafana's built-in intervals. With 1 s scrapes a 1m window holds ~60 samples;
# rate() needs two, so every panel has data a few seconds after traffic starts.
BUILTIN_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
READY_WITHIN_SECONDS = 45.0


@dataclass(frozen=True)
class Query:
    """One PromQL expression to run, and where it comes from (for failure messages)."""

    source: str
    expr: str


def to_promql(expr: str, variables: dict[str, str]) -> str:
    """Expand Grafana variables (`$name`, `${name}`) as Grafana would with "All" selected."""

    def expand(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", expand, expr)


def panel_queries() -> list[Query]:
    """Return every panel target of every dashboard, variables expanded."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = dict(BUILTIN_INTERVALS)
        for variable in dashboard.get("templating", {}).get("list", []):
            variables[variable["name"]] = variable.get("allValue") or ".*"
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                source = f"{path.name}: panel {panel['id']} {panel['title']!r} target {target['refId']}"
                queries.append(Query(source, to_promql(target["expr"], variables)))
    return queries


def recording_rules() -> list[Query]:
    """Return one query per recording rule: its recorded series, as Prometheus stored it."""
    queries = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            for rule in group.get("rules", []):
                if "record" in rule:
                    queries.append(
                        Query(f"{path.name}: group {group['name']!r} record {rule['record']}", rule["record"])
                    )
    return queries


PANEL_QUERIES = panel_queries()
RULE_QUERIES = recording_rules()


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API answered with an error (bad PromQL, bad parameter)."""


class Prometheus:
    """A prometheus process on a free loopback port, scraping the given targets every second."""

    def __init__(self, directory: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.directory = directory
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [address]}]} for job, address in targets.items()
            ],
        }
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))

    @contextmanager
    def running(self) -> Iterator[Prometheus]:
        log_path = self.directory / "prometheus.log"
        with log_path.open("wb") as log:
            args = [
                require_tool("prometheus", "prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ]
            with terminated_on_exit(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)) as process:
                deadline = time.monotonic() + 30
                while not self._ready():
                    assert process.poll() is None, (
                        f"prometheus exited {process.returncode}: {log_path.read_text()[-3000:]}"
                    )
                    assert time.monotonic() < deadline, f"prometheus not ready in 30 s: {log_path.read_text()[-3000:]}"
                    time.sleep(0.2)
                yield self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> object:
        """Call the HTTP API; return `data`, or fail with Prometheus's own error message."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as ex:
            body = json.loads(ex.read())
        if body["status"] != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]


@contextmanager
def terminated_on_exit(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield process
    finally:
        stop_process(process, timeout=15)


def has_a_number(result: list[dict]) -> bool:
    """Tell whether an instant-query result holds at least one finite sample."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def problem(prometheus: Prometheus, query: Query) -> str | None:
    """Return why the query is not usable on a dashboard, or None when it returns numbers."""
    try:
        result = prometheus.query(query.expr)
    except PrometheusError as ex:
        return f"{query.source}: Prometheus rejected the query: {ex}\n  {query.expr}"
    if not result:
        return f"{query.source}: empty result\n  {query.expr}"
    if not has_a_number(result):
        return f"{query.source}: only NaN/Inf values {result}\n  {query.expr}"
    return None


def drive_traffic(port: int, stop: threading.Event, errors: list[str]) -> None:
    """Send mixed requests until told to stop: misses, repeated texts (cache hits), batches, 4xx."""
    i = 0
    while not stop.is_set():
        i += 1
        try:
            call(port, "POST", "/infer", {"text": f"traffic text number {i} is rather good"})
            call(port, "POST", "/infer", {"text": "the same text every time, so the cache answers"})
            if i % 3 == 0:
                call(port, "POST", "/infer/batch", {"texts": [f"batch {i} item {n}" for n in range(5)]})
            if i % 4 == 0:
                call(port, "POST", "/infer", {"text": "   "})  # 422 invalid_input
            if i % 5 == 0:
                call(port, "GET", "/nope")  # 404
            if i % 10 == 0:
                call(port, "GET", "/readyz")  # reports spool bytes
        except OSError as ex:
            errors.append(f"request {i}: {ex!r}")
        stop.wait(0.02)


def with_label_mix(model_dir: Path, destination: Path) -> Path:
    """Copy the artifact, giving its metadata a `label_mix` (the dummy, never evaluated, has none).

    The drift rules and panels compare the live mix with the served version's mix
    (falcon_model_expected_label_share); without one they would have nothing to show.
    """
    shutil.copytree(model_dir, destination)
    metadata_path = destination / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["label_mix"] = {"negative": 0.25, "neutral": 0.25, "positive": 0.5}
    metadata_path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return destination


@pytest.fixture(scope="module")
def prometheus(dummy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Start Redis, PostgreSQL, falcon-svc, node-exporter and Prometheus; drive traffic; wait for data."""
    require_tool("prometheus", "prometheus")  # before starting anything else
    node_exporter_binary = require_tool("prometheus-node-exporter", "prometheus-node-exporter")
    tmp = tmp_path_factory.mktemp("dashboards")
    for name in ("redis", "pg", "prometheus"):
        (tmp / name).mkdir()
    with ExitStack() as stack:
        redis_server = RedisServer(tmp / "redis")
        stack.callback(redis_server.stop)
        redis_server.start()
        postgres = PostgresServer(tmp / "pg")
        stack.callback(postgres.destroy)
        postgres.init()
        apply_migrations(postgres.dsn)

        service_port = free_port()
        model_dir = with_label_mix(dummy_model_dir, tmp / "model")
        env = service_env(
            model_dir, service_port, tmp, WORKER_CLASS="sync",
            REDIS_URL=redis_server.url, DATABASE_URL=postgres.dsn, LOG_FLUSH_INTERVAL_MS="50",
        )  # fmt: skip
        stack.enter_context(running_service(env, tmp / "service.log"))

        node_port = free_port()
        node_log = stack.enter_context((tmp / "node-exporter.log").open("wb"))
        node_exporter = subprocess.Popen(
            [node_exporter_binary, f"--web.listen-address=127.0.0.1:{node_port}"],
            stdout=node_log,
            stderr=subprocess.STDOUT,
        )
        stack.enter_context(terminated_on_exit(node_exporter))
        wait_for_port(node_port)

        targets = {"falcon": f"127.0.0.1:{service_port}", "node": f"127.0.0.1:{node_port}"}
        server = stack.enter_context(Prometheus(tmp / "prometheus", targets).running())

        stop, errors = threading.Event(), []
        traffic = threading.Thread(target=drive_traffic, args=(service_port, stop, errors), daemon=True)
        traffic.start()
        stack.callback(traffic.join, 15)
        stack.callback(stop.set)

        # NOTE: poll rather than sleep: the run is as short as the slowest query allows.
        deadline = time.monotonic() + READY_WITHIN_SECONDS
        while any(problem(server, query) for query in PANEL_QUERIES + RULE_QUERIES):
            if time.monotonic() > deadline:
                break  # the tests below name each query that still has no data
            time.sleep(1)
        up = {series["metric"]["job"]: series["value"][1] for series in server.query("up")}
        assert up == {"falcon": "1", "node": "1"}, f"scrape targets not all up: {up}"
        assert not errors, f"traffic requests failed: {errors[:5]}"
        yield server


def test_dashboards_and_rules_were_found():
    assert DASHBOARDS, "no grafana/dashboards/*.json"
    assert PANEL_QUERIES, "the dashboards have no panel queries"


@pytest.mark.parametrize("query", PANEL_QUERIES, ids=lambda query: query.source)
def test_panel_query_returns_data(prometheus, query):
    assert (reason := problem(prometheus, query)) is None, reason


@pytest.mark.parametrize("query", RULE_QUERIES, ids=lambda query: query.source)
def test_recording_rule_returns_data(prometheus, query):
    assert (reason := problem(prometheus, query)) is None, reason


def test_every_rule_file_loads_and_evaluates_cleanly(prometheus):
    assert RULE_FILES, "no prometheus/rules/*.yml: the recording and alert rules are missing"
    groups = prometheus.api("rules")["groups"]
    loaded = {Path(group["file"]).name for group in groups}
    assert loaded == {path.name for path in RULE_FILES}, f"rule files Prometheus loaded: {sorted(loaded)}"
    broken = [
        f"{group['file']}: {rule['name']}: {rule.get('lastError')}"
        for group in groups
        for rule in group["rules"]
        if rule.get("health") != "ok"
    ]
    assert not broken, f"rules that do not evaluate: {broken}"
