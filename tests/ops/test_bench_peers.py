"""`make bench-peers` (scripts/bench/peers/): the export MLServer serves, the wrk body, the arithmetic.

The bench itself installs MLServer and runs minutes of load, so it is not run here.
What it stands on is: the exported joblib loads without falcon_svc (as in MLServer's
venv) and predicts what the service predicts; v2_texts.lua sends both servers the
same OIP v2 body with unique_texts.lua's texts; the ratios are paired per round and
the median taken; the script refuses early, without installing anything, when
falcon-svc is not there, and stops "MLServer" (its whole process group) whatever
happens.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port
from tools import alive, model_required, require_tool, skip_or_fail

from falcon_svc.model import load_model
from falcon_svc.model.scorer import VERIFY_TOLERANCE
from falcon_svc.training import build_dummy_model

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS = REPO_ROOT / "scripts" / "bench" / "peers"
sys.path.insert(0, str(PEERS))
# running_service/service_env live beside the integration tests; pytest puts that
# directory on sys.path only when it collects it.
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))

import peer_models  # noqa: E402
import peer_results  # noqa: E402
from test_gunicorn_serving import running_service, service_env  # noqa: E402

# Loads the exported file the way MLServer's runtime does (joblib.load), in a process
# where importing falcon_svc fails, and scores the texts it is given as MLServer's
# NumpyCodec hands them over (a numpy str array).
LOADER = """
import importlib.abc, json, sys

class NoFalconSvc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "falcon_svc":
            raise ImportError(f"{name} must not be needed to load the export")

sys.meta_path.insert(0, NoFalconSvc())
import joblib, numpy as np
pipeline = joblib.load(sys.argv[1])
texts = np.array(json.loads(sys.argv[2]), dtype=str)
print(json.dumps({
    "classes": [str(label) for label in pipeline.classes_],
    "predict": [str(label) for label in pipeline.predict(texts)],
    "proba": pipeline.predict_proba(texts).tolist(),
    "falcon_modules": sorted(name for name in sys.modules if name.split(".")[0] == "falcon_svc"),
}))
"""
TEXTS = [
    *peer_models.PROBE_TEXTS,
    "I love this phone, it is wonderful!",
    "This is the WORST service ever :(",
    "The parcel is on the table.",
]
WRK_OUTPUT = (
    "Running 10s test @ http://127.0.0.1:8000\n  1 threads and 8 connections\n"
    '{"requests": 5012, "seconds": 10.00, "rps": 501.2, "p50_ms": 15.500, "p90_ms": 20.000, '
    '"p99_ms": 28.400, "max_ms": 40.000, "non2xx": 0, "socket_errors": 0}\n'
)


def summary(rps: float, failures: int = 0) -> str:
    return json.dumps(
        {"requests": int(rps * 10), "rps": rps, "p50_ms": 1.5, "p99_ms": 4.0, "non2xx": failures, "socket_errors": 0}
    )


def run(round_: int, server: str, texts: str, rps: float, failures: int = 0) -> peer_results.Run:
    return peer_results.parse_line(f"{round_}\t{server}\t{texts}\t{summary(rps, failures)}")


def load_export(path: Path, texts: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(path), json.dumps(texts)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"the export does not load without falcon_svc:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def assert_same_predictions(model_dir: Path, exported: dict) -> None:
    expected = load_model(model_dir).predict(TEXTS)
    assert exported["falcon_modules"] == [], f"loading imported {exported['falcon_modules']}"
    assert exported["predict"] == [p.label for p in expected], "MLServer's 'predict' output would differ"
    for text, row, prediction in zip(TEXTS, exported["proba"], expected, strict=True):
        ours = [prediction.probabilities[label] for label in exported["classes"]]
        difference = max(abs(a - b) for a, b in zip(row, ours, strict=True))
        assert difference <= VERIFY_TOLERANCE, f"{text!r}: probabilities differ by {difference:.3g}"


# --- the export ---------------------------------------------------------------------


def test_export_loads_without_falcon_svc_and_predicts_as_the_service(dummy_model_dir: Path, tmp_path: Path) -> None:
    folder = peer_models.export_for_mlserver(dummy_model_dir, tmp_path / "repo")
    assert_same_predictions(dummy_model_dir, load_export(folder / peer_models.MODEL_FILE, TEXTS))


def test_export_of_the_trained_model_predicts_as_the_service(tmp_path: Path) -> None:
    model_dir = REPO_ROOT / "models" / "sentiment"
    if not (model_dir / "metadata.json").is_file():
        skip_or_fail(f"no trained model in {model_dir} (make model)", required=model_required())
    folder = peer_models.export_for_mlserver(model_dir, tmp_path / "repo")
    exported = load_export(folder / peer_models.MODEL_FILE, TEXTS)
    assert_same_predictions(model_dir, exported)
    probe_labels = set(exported["predict"][: len(peer_models.PROBE_TEXTS)])
    assert len(probe_labels) >= 2, f"the probe texts all get {probe_labels}: the agreement check would prove little"


def test_export_writes_model_settings_for_the_sklearn_runtime(dummy_model_dir: Path, tmp_path: Path) -> None:
    folder = peer_models.export_for_mlserver(dummy_model_dir, tmp_path / "repo")
    settings = json.loads((folder / peer_models.MODEL_SETTINGS_FILE).read_text())
    metadata = json.loads((dummy_model_dir / "metadata.json").read_text())
    assert folder.name == settings["name"] == metadata["name"]
    assert settings["implementation"] == "mlserver_sklearn.SKLearnModel"
    assert (folder / settings["parameters"]["uri"]).is_file()
    assert settings["parameters"]["version"] == metadata["version"]


def test_export_refuses_a_tampered_artifact(dummy_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for item in dummy_model_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    with (copy / "model.joblib").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(Exception, match="sha256"):
        peer_models.export_for_mlserver(copy, tmp_path / "repo")


def test_export_leaves_falcon_svc_pickled_by_reference_afterwards(dummy_model_dir: Path, tmp_path: Path) -> None:
    peer_models.export_for_mlserver(dummy_model_dir, tmp_path / "repo")
    import cloudpickle

    for module in peer_models.PICKLED_BY_VALUE:
        assert module.__name__ not in cloudpickle.list_registry_pickle_by_value()


# --- the agreement check --------------------------------------------------------------


def test_labels_come_from_either_server_reply_shape() -> None:
    falcon = {"outputs": [{"name": "confidence", "data": [0.9]}, {"name": "label", "data": ["positive"]}]}
    mlserver = {"outputs": [{"name": "predict", "datatype": "BYTES", "data": ["positive"]}]}
    assert peer_models.labels_from_reply(falcon) == peer_models.labels_from_reply(mlserver) == ["positive"]
    with pytest.raises(ValueError, match="no 'label' or 'predict'"):
        peer_models.labels_from_reply({"outputs": [{"name": "predict_proba", "data": [0.1]}]})


def test_disagreements_name_each_text_and_a_short_reply() -> None:
    texts = ["a", "b", "c"]
    assert peer_models.disagreements(["x", "y", "z"], ["x", "y", "z"], texts) == []
    assert peer_models.disagreements(["x", "y", "z"], ["x", "q", "z"], texts) == ["'b': y vs q"]
    assert peer_models.disagreements(["x", "y"], ["x", "y", "z"], texts) == ["3 texts sent, 2 and 3 labels returned"]


def test_v2_request_is_one_bytes_tensor_named_text() -> None:
    assert peer_models.v2_request(["a", "b"]) == {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]
    }


# --- wrk output and the arithmetic ------------------------------------------------------


def test_parse_wrk_summary_reads_the_last_json_line() -> None:
    parsed = peer_results.parse_wrk_summary(WRK_OUTPUT)
    assert (parsed["rps"], parsed["p50_ms"], parsed["p99_ms"], parsed["non2xx"]) == (501.2, 15.5, 28.4, 0)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("Running 10s test\nconnect refused\n", "no JSON summary line"),
        ('{"requests": 1, "rps": 1.0}\n', "lacks p50_ms, p99_ms, non2xx, socket_errors"),
    ],
)
def test_parse_wrk_summary_refuses_output_without_a_full_summary(output: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peer_results.parse_wrk_summary(output)


def test_parse_line_counts_non2xx_and_socket_errors_as_failures() -> None:
    line = '2\tmlserver\tunique\t{"requests": 9, "rps": 0.9, "p50_ms": 1, "p99_ms": 2, "non2xx": 3, "socket_errors": 4}'
    parsed = peer_results.parse_line(line)
    assert (parsed.round, parsed.server, parsed.texts, parsed.rps, parsed.failures) == (2, "mlserver", "unique", 0.9, 7)


@pytest.mark.parametrize(
    "line", ["1\tmlserver\tunique", f"1\ttriton\tunique\t{summary(1)}", f"1\tmlserver\tcached\t{summary(1)}"]
)
def test_parse_line_refuses_unknown_fields(line: str) -> None:
    with pytest.raises(ValueError, match=r"expected ROUND|unknown server"):
        peer_results.parse_line(line)


def test_ratios_pair_the_servers_within_each_round() -> None:
    runs = [
        run(1, "mlserver", "unique", 500),
        run(1, "falcon-svc", "unique", 2500),
        run(2, "falcon-svc", "unique", 1000),  # a noisy neighbour slowed this whole round
        run(2, "mlserver", "unique", 250),
        run(3, "mlserver", "unique", 400),
        run(3, "falcon-svc", "unique", 2400),
        run(4, "mlserver", "unique", 400),  # an unpaired run counts for no ratio
        run(1, "mlserver", "repeated", 500),
    ]
    assert peer_results.round_ratios(runs, "unique") == [5.0, 4.0, 6.0]
    assert peer_results.median_or_none(peer_results.round_ratios(runs, "unique")) == 5.0
    assert peer_results.round_ratios(runs, "repeated") == []
    assert peer_results.median_or_none([]) is None


def test_render_shows_medians_rounds_and_the_median_ratio() -> None:
    unique = [(1, "mlserver", 500), (1, "falcon-svc", 4000), (2, "mlserver", 480), (2, "falcon-svc", 3000)]
    unique += [(3, "mlserver", 520), (3, "falcon-svc", 4680)]
    runs = [run(n, server, "unique", rps) for n, server, rps in unique]
    runs += [run(1, "falcon-svc", "repeated", 6500), run(1, "mlserver", "repeated", 500)]
    table = peer_results.render(runs)
    assert "mlserver    unique        500.0" in table, table
    assert "falcon-svc  unique       4000.0" in table, table
    assert "500 480 520" in table, table
    assert "unique texts: falcon-svc / MLServer = 8.00x (median of rounds: 8.00, 6.25, 9.00; " in table, table
    assert "issue 13 target >= 8x" in table, table
    assert "repeated texts: falcon-svc / MLServer = 13.00x" in table, table


def test_results_exit_status_fails_on_failed_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    results.write_text(f"1\tmlserver\tunique\t{summary(500)}\n1\tfalcon-svc\tunique\t{summary(4000)}\n")
    assert peer_results.main([str(results)]) == 0
    results.write_text(f"1\tmlserver\tunique\t{summary(500, failures=12)}\n1\tfalcon-svc\tunique\t{summary(4000)}\n")
    assert peer_results.main([str(results)]) == 1
    assert "round 1 mlserver unique: 12 failed requests" in capsys.readouterr().err


# --- the wrk script ------------------------------------------------------------------


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answer 200 to every POST and keep (path, body) of the first ones."""

    protocol_version = "HTTP/1.1"
    requests: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if len(self.requests) < 50:
            self.requests.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
    requests: list[tuple[str, bytes]] = []
    handler = type("Handler", (Recorder,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], requests
    server.shutdown()
    server.server_close()


def wrk_texts(port: int, requests: list[tuple[str, bytes]], **env: str) -> tuple[set[str], list[str]]:
    wrk = require_tool("wrk", "wrk")
    command = [wrk, "-t1", "-c1", "-d1s", "-s", str(PEERS / "v2_texts.lua"), f"http://127.0.0.1:{port}"]
    output = subprocess.run(command, check=False, env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    assert output.returncode == 0 and peer_results.parse_wrk_summary(output.stdout), output.stderr
    paths, texts = set(), []
    for path, body in requests:
        request = json.loads(body)
        assert request == peer_models.v2_request(request["inputs"][0]["data"]), request
        paths.add(path)
        texts.append(request["inputs"][0]["data"][0])
    assert texts, "wrk sent nothing"
    return paths, texts


def test_wrk_script_sends_v2_bodies_with_unique_tagged_texts(recorder: tuple[int, list]) -> None:
    port, requests = recorder
    paths, texts = wrk_texts(port, requests, BENCH_RUN="77-2")
    assert paths == {"/v2/models/sentiment/infer"}
    assert len(set(texts)) == len(texts), "unique texts repeat"
    assert all(" Ref 77-2-0-" in text for text in texts), texts[:3]


def test_wrk_script_repeats_one_text_and_honours_the_path(recorder: tuple[int, list]) -> None:
    port, requests = recorder
    paths, texts = wrk_texts(port, requests, BENCH_REPEAT="1", BENCH_PATH="/v2/models/other/infer")
    assert paths == {"/v2/models/other/infer"}
    assert set(texts) == {"The delivery was excellent and the staff were friendly."}


# --- the script ----------------------------------------------------------------------


def bench(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEERS_VENV": str(tmp_path / "venv"), "DURATION": "1", "WARMUP": "1", "ROUNDS": "1", **env}
    return subprocess.run(
        ["bash", str(PEERS / "bench_peers.sh")], check=False, env=env, capture_output=True, text=True, timeout=120
    )


def test_bench_refuses_before_installing_when_falcon_svc_is_not_there(tmp_path: Path) -> None:
    result = bench(tmp_path, FALCON_URL=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1, result.stderr
    assert "falcon-svc is not ready at http://127.0.0.1:" in result.stderr, result.stderr
    assert not (tmp_path / "venv").exists(), "MLServer was installed for a bench that cannot run"


# A stand-in for the `mlserver` executable of the peers venv: it starts a child process
# (as MLServer starts its parallel workers), records both pids, serves readiness and
# answers every inference with a label the real model never gives.
FAKE_MLSERVER = """#!{python}
import http.server, json, os, subprocess, sys
from pathlib import Path
repo = Path(sys.argv[2])
port = json.loads((repo / "settings.json").read_text())["http_port"]
child = subprocess.Popen(["sleep", "600"])
Path(os.environ["FAKE_PIDS"]).write_text(f"{{os.getpid()}} {{child.pid}}")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_POST(self):
        count = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"][0]["data"])
        body = json.dumps({{"outputs": [{{"name": "predict", "data": ["sarcastic"] * count}}]}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.mark.parametrize("mismatch", ["labels", "version"])
def test_bench_refuses_two_different_models_and_stops_mlserver_and_its_workers(
    mismatch: str, dummy_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = dummy_model_dir
    expected = ["falcon-svc and MLServer label the probe texts differently", "vs sarcastic"]
    if mismatch == "version":
        # falcon-svc serves the dummy model; the bench is told to export another one.
        model_dir = tmp_path / "other-model"
        build_dummy_model(model_dir)
        metadata = json.loads((model_dir / "metadata.json").read_text())
        metadata["version"] += "-other"
        (model_dir / "metadata.json").write_text(json.dumps(metadata))
        expected = [f"not {metadata['version']} from {model_dir}: set MODEL_DIR to a copy of the model it serves"]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "requirements-peers.lock").write_bytes((REPO_ROOT / "requirements-peers.lock").read_bytes())
    fake = venv / "bin" / "mlserver"
    fake.write_text(FAKE_MLSERVER.format(python=sys.executable))
    fake.chmod(0o755)
    pids_file = tmp_path / "pids"
    port = free_port()
    with running_service(service_env(dummy_model_dir, port, tmp_path), tmp_path / "service.log"):
        result = bench(
            tmp_path, FALCON_URL=f"http://127.0.0.1:{port}", MODEL_DIR=str(model_dir), FAKE_PIDS=str(pids_file)
        )
    assert result.returncode == 1, result.stdout + result.stderr
    for message in expected:
        assert message in result.stderr, result.stderr
    assert "round 1" not in result.stdout, "the bench ran load against two different models"
    pids = [int(pid) for pid in pids_file.read_text().split()]
    # The group got SIGKILL before the script exited; the kernel may still be reaping.
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"bench_peers.sh left the fake MLServer's processes {survivors} running"


# --- RESULTS_DIR: the raw results and their numbers, kept for the plots ---------------------


def test_results_json_holds_each_series_and_the_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        f"1\tmlserver\tunique\t{summary(500)}",
        f"1\tfalcon-svc\tunique\t{summary(2500)}",
        f"2\tfalcon-svc\tunique\t{summary(2000)}",
        f"2\tmlserver\tunique\t{summary(500)}",
        f"1\tfalcon-svc\trepeated\t{summary(6000)}",
    ]
    results = tmp_path / "results"
    results.write_text("\n".join(lines) + "\n")
    assert peer_results.main([str(results), "--json", str(tmp_path / "summary.json")]) == 0
    numbers = json.loads((tmp_path / "summary.json").read_text())
    assert numbers["ratios"] == {"unique": {"median": 4.5, "rounds": [5.0, 4.0], "target": 8.0}}
    falcon_unique = numbers["series"][1]
    assert falcon_unique == {
        "server": "falcon-svc",
        "texts": "unique",
        "rps": 2250.0,
        "p50_ms": 1.5,
        "p99_ms": 4.0,
        "failures": 0,
        "rounds": [1, 2],
        "rps_each": [2500.0, 2000.0],
        "p99_each": [4.0, 4.0],
    }
    assert [(row["server"], row["texts"]) for row in numbers["series"]] == [
        ("mlserver", "unique"),
        ("falcon-svc", "unique"),
        ("falcon-svc", "repeated"),
    ]
    # The table printed is built from the same numbers.
    assert "unique texts: falcon-svc / MLServer = 4.50x (median of rounds: 5.00, 4.00; " in capsys.readouterr().out


# A stand-in for MLServer that serves the exported model itself (joblib, as MLServer's
# sklearn runtime does): the probes agree, so the bench runs its rounds against it.
AGREEING_MLSERVER = """#!{python}
import http.server, json, sys
from pathlib import Path
if sys.argv[1:] == ["--version"]:
    print("mlserver, version 1.7.1-stand-in")
    sys.exit(0)
import joblib, numpy as np
repo = Path(sys.argv[2])
port = json.loads((repo / "settings.json").read_text())["http_port"]
(model_file,) = repo.glob("*/model.joblib")
pipeline = joblib.load(model_file)
Path({pid_file!r}).write_text(str(__import__("os").getpid()))
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def reply(self, body):
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(b"")
    def do_POST(self):
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"][0]["data"]
        labels = [str(label) for label in pipeline.predict(np.array(texts, dtype=str))]
        self.reply(json.dumps({{"outputs": [{{"name": "predict", "datatype": "BYTES", "data": labels}}]}}).encode())
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.mark.integration
def test_bench_keeps_results_summary_and_meta_in_results_dir(dummy_model_dir: Path, tmp_path: Path) -> None:
    require_tool("wrk", "wrk")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "requirements-peers.lock").write_bytes((REPO_ROOT / "requirements-peers.lock").read_bytes())
    fake = venv / "bin" / "mlserver"
    fake.write_text(AGREEING_MLSERVER.format(python=sys.executable, pid_file=str(tmp_path / "pid")))
    fake.chmod(0o755)
    kept = tmp_path / "kept"
    port = free_port()
    with running_service(service_env(dummy_model_dir, port, tmp_path), tmp_path / "service.log"):
        result = bench(
            tmp_path,
            FALCON_URL=f"http://127.0.0.1:{port}",
            MODEL_DIR=str(dummy_model_dir),
            RESULTS_DIR=str(kept),
            CONNECTIONS="2",
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"bench-peers: results kept in {kept}" in result.stdout, result.stdout
    raw = (kept / "results").read_text().splitlines()
    assert sorted(line.split("\t")[1] + " " + line.split("\t")[2] for line in raw) == [
        "falcon-svc repeated",
        "falcon-svc unique",
        "mlserver repeated",
        "mlserver unique",
    ], raw
    numbers = json.loads((kept / "summary.json").read_text())
    assert set(numbers["ratios"]) == {"unique", "repeated"}, numbers["ratios"]
    assert all(ratio["median"] > 0 for ratio in numbers["ratios"].values()), numbers["ratios"]
    meta = json.loads((kept / "meta.json").read_text())
    assert meta["settings"] | {"falcon_url": "-"} == {
        "kind": "peers",
        "falcon_url": "-",
        "mlserver": "1.7.1-stand-in",
        "parallel_workers": "2",
        "duration_s": "1",
        "connections": "2",
        "threads": "1",
        "rounds": "1",
    }, meta
    assert meta["machine"]["nproc"] == len(os.sched_getaffinity(0)), meta
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "bench_peers.sh left the stand-in MLServer running"
