"""The performance plots (scripts/bench/plots/): the sweeps, their parsing, and the PNGs.

What the plots stand on is tested with real producers: the load sweep runs the k6
baseline (scripts/load_test.sh) against a real gunicorn master for a couple of
seconds per rate, so its summary exports have k6's real shape; the worker sweep starts
and stops real `falcon-svc serve` masters and runs a real wrk. Latency limits are
set so that a run holds (60 s) or breaks (1 microsecond) its thresholds whatever the
machine's speed: the tests prove the plumbing (a crossed threshold is recorded and the
sweep goes on; any other failure stops it), never the service's speed.

matplotlib comes from requirements-plots.lock: under CI or FALCON_REQUIRE_TOOLS=1 a
missing matplotlib, k6 or wrk fails these tests instead of skipping them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest
from servers import free_port
from tools import alive, require_tool, skip_or_fail, tools_required

REPO_ROOT = Path(__file__).resolve().parents[2]
PLOTS = REPO_ROOT / "scripts" / "bench" / "plots"
PEERS = REPO_ROOT / "scripts" / "bench" / "peers"
sys.path.insert(0, str(PLOTS))
sys.path.insert(0, str(PEERS))
# running_service/service_env live beside the integration tests; pytest puts that
# directory on sys.path only when it collects it.
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))

import peer_results  # noqa: E402
import plot_data  # noqa: E402
import run_meta  # noqa: E402
from test_gunicorn_serving import running_service, service_env  # noqa: E402
from test_supply_chain import input_pins, lock_entries  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Loose or impossible limits: the run's verdict is the test's choice, not the machine's.
HOLDS = {"LOAD_P95_MS": "60000", "LOAD_P99_MS": "60000"}
BREAKS = {"LOAD_P99_MS": "0.001"}

# The shape of `k6 run --summary-export` (k6 1.x; trend stats as summaryTrendStats asks,
# in ms; a threshold's value true when crossed; no dropped_iterations when none were).
K6_SUMMARY = {
    "root_group": {"name": "", "path": "", "id": "d41d8cd98f00b204e9800998ecf8427e", "groups": {}, "checks": {}},
    "metrics": {
        "http_reqs": {"count": 3001, "rate": 299.9},
        "http_req_duration": {
            "avg": 3.1,
            "min": 0.8,
            "med": 2.5,
            "max": 80.0,
            "p(90)": 5.0,
            "p(95)": 7.5,
            "p(99)": 31.0,
            "thresholds": {"p(95)<25": False, "p(99)<50": False},
        },
        "http_req_failed": {"passes": 3, "fails": 2998, "value": 0.001, "thresholds": {"rate<0.01": False}},
        "iterations": {"count": 3000, "rate": 299.8},
    },
}


def k6_summary(**changes: dict) -> dict:
    summary = json.loads(json.dumps(K6_SUMMARY))
    for name, fields in changes.items():
        summary["metrics"].setdefault(name, {}).update(fields)
    return summary


def wrk_line(rps: float, p50: float = 1.0, p99: float = 4.0, non2xx: int = 0, socket_errors: int = 0) -> str:
    return json.dumps(
        {
            "requests": int(rps * 10),
            "seconds": 10.0,
            "rps": rps,
            "p50_ms": p50,
            "p90_ms": p99 / 2,
            "p99_ms": p99,
            "max_ms": p99 * 2,
            "non2xx": non2xx,
            "socket_errors": socket_errors,
        }
    )


def write_meta(directory: Path, **settings: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    document = run_meta.meta(settings, now=datetime(2026, 12, 2, 9, 15, 30, tzinfo=UTC))
    document["machine"] = {"nproc": 2, "cpu": "Test CPU", "hostname": "bench"}
    (directory / "meta.json").write_text(json.dumps(document))


def png_size(path: Path) -> tuple[int, int]:
    """Return (width, height) from a PNG's IHDR chunk; fail when the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG: {data[:8]!r}"
    assert data[12:16] == b"IHDR", f"{path}: the first chunk is {data[12:16]!r}, not IHDR"
    return struct.unpack(">II", data[16:24])


def descendants(pid: int) -> list[int]:
    """Return the children of `pid`, their children and so on, from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def survivors(pids: list[int], seconds: float = 15) -> list[int]:
    """Return the process groups of `pids` still alive after `seconds` to stop, then kill them.

    The seconds are a bound for the kernel to reap, not a timing that is asserted; the
    kill keeps a broken sweep's servers (each master leads its group) from outliving the test.
    """
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        os.killpg(pid, signal.SIGKILL)
    return left


@pytest.fixture(scope="module")
def plot() -> ModuleType:
    try:
        import matplotlib
    except ImportError:
        skip_or_fail(
            "matplotlib not installed: `make plots` installs requirements-plots.lock into .venv",
            required=tools_required(),
        )
    assert matplotlib.__version__ == input_pins(REPO_ROOT / "requirements-plots.txt")["matplotlib"], (
        f"matplotlib {matplotlib.__version__} is installed, not requirements-plots.txt's: install the lock"
    )
    import plot as module

    return module


@pytest.fixture(scope="module")
def k6() -> str:
    beside_python = Path(sys.executable).parent / "k6"
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    return require_tool("k6", "k6 (requirements-load.lock: make venv)")


# --- the lock -------------------------------------------------------------------------


def test_the_plots_lock_pins_matplotlib_by_hash_and_agrees_with_the_dev_lock() -> None:
    plots = lock_entries(REPO_ROOT / "requirements-plots.lock")
    for name, version in input_pins(REPO_ROOT / "requirements-plots.txt").items():
        assert plots.get(name, ("missing",))[0] == version, f"requirements-plots.lock lacks {name}=={version}"
    unhashed = [name for name, (_version, hashes) in plots.items() if not hashes]
    assert not unhashed, f"requirements-plots.lock: entries without a sha256: {unhashed}"
    # Both go into .venv: installing the plots must not change what the service runs on.
    dev = lock_entries(REPO_ROOT / "requirements-dev.lock")
    differ = {
        name: (plots[name][0], dev[name][0]) for name in plots.keys() & dev.keys() if plots[name][0] != dev[name][0]
    }
    assert not differ, f"requirements-plots.lock and requirements-dev.lock disagree (plots, dev): {differ}"
    assert "numpy" in plots.keys() & dev.keys(), "numpy, which both need, should be pinned in both"


def test_the_installed_plot_packages_are_the_locked_versions(plot: ModuleType) -> None:
    plots = lock_entries(REPO_ROOT / "requirements-plots.lock")
    installed = {name: importlib.metadata.version(name) for name in plots}
    differ = {name: (installed[name], version) for name, (version, _) in plots.items() if installed[name] != version}
    assert not differ, f"installed vs requirements-plots.lock: {differ}"


# --- meta.json ------------------------------------------------------------------------


def test_meta_names_the_machine_and_the_utc_date(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD   EPYC 7B13\nflags\t\t: fpu\n")
    assert run_meta.cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert run_meta.cpu_model(tmp_path / "absent")  # the architecture, whatever it is
    document = run_meta.meta({"rates": "10 20"}, now=datetime(2026, 12, 2, 9, 15, 30, tzinfo=UTC))
    assert document["date"] == "2026-12-02T09:15:30Z"
    assert document["settings"] == {"rates": "10 20"}
    assert document["machine"]["nproc"] == len(os.sched_getaffinity(0))
    out = tmp_path / "meta.json"
    assert run_meta.main([str(out), "kind=load", "url=http://x/?a=b"]) == 0
    assert json.loads(out.read_text())["settings"] == {"kind": "load", "url": "http://x/?a=b"}
    assert run_meta.main([str(out), "no-equals-sign"]) == 2


def test_where_and_when_is_every_plots_subtitle(tmp_path: Path) -> None:
    write_meta(tmp_path)
    assert plot_data.where_and_when(plot_data.read_meta(tmp_path)) == "bench: 2 cores (Test CPU), 2026-12-02 09:15 UTC"
    (tmp_path / "meta.json").write_text('{"date": "2026-12-02T09:15:30Z", "machine": {}}')
    with pytest.raises(ValueError, match=r"lacks the date or machine\.nproc"):
        plot_data.read_meta(tmp_path)


# --- k6 summaries and wrk lines into points -------------------------------------------------


def test_a_k6_summary_export_becomes_a_point() -> None:
    point = plot_data.load_point(K6_SUMMARY, offered_rps=300, exit_status=0)
    assert point == plot_data.LoadPoint(
        offered_rps=300.0,
        achieved_rps=299.9,
        requests=3001,
        failed_share=0.001,
        p50_ms=2.5,
        p95_ms=7.5,
        p99_ms=31.0,
        dropped=0,
        crossed=(),
        exit_status=0,
    )
    assert not point.past_knee


def test_crossed_thresholds_and_dropped_requests_mark_the_knee() -> None:
    summary = k6_summary(
        http_req_duration={"thresholds": {"p(95)<25": False, "p(99)<50": True}},
        dropped_iterations={"count": 40, "rate": 4.0, "thresholds": {"count<=30": True}},
    )
    point = plot_data.load_point(summary, offered_rps=800, exit_status=99)
    assert point.crossed == ("dropped_iterations: count<=30", "http_req_duration: p(99)<50")
    assert (point.dropped, point.past_knee) == (40, True)
    held = plot_data.load_point(K6_SUMMARY, 400, 0)
    # k6's exit status alone counts too (a threshold the export did not list).
    assert plot_data.load_point(K6_SUMMARY, 900, 99).past_knee
    assert plot_data.knee([point, held]) == point
    assert plot_data.knee([held]) is None


@pytest.mark.parametrize(
    ("summary", "message"),
    [
        ({"root_group": {}}, "not a k6 summary export"),
        (k6_summary(http_req_duration={"med": None}), r"lacks http_req_duration\.med"),
        ({"metrics": {"http_reqs": {"count": 1}}}, r"lacks http_reqs\.rate"),
    ],
)
def test_a_summary_without_what_the_plot_needs_is_refused(summary: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plot_data.load_point(summary, 100, 0, "k6-100.json")


def test_a_load_sweep_directory_reads_in_rate_order(tmp_path: Path) -> None:
    (tmp_path / "k6-100.json").write_text(json.dumps(K6_SUMMARY))
    (tmp_path / "k6-50.json").write_text(json.dumps(k6_summary(http_reqs={"rate": 50.1})))
    (tmp_path / "runs.tsv").write_text("100\t99\tk6-100.json\n50\t0\tk6-50.json\n")
    points = plot_data.read_load_sweep(tmp_path)
    assert [(p.offered_rps, p.achieved_rps, p.exit_status) for p in points] == [(50, 50.1, 0), (100, 299.9, 99)]
    (tmp_path / "runs.tsv").write_text("100\t0\tk6-missing.json\n")
    with pytest.raises(ValueError, match="cannot read the k6 summary"):
        plot_data.read_load_sweep(tmp_path)


def test_wrk_lines_become_points_and_rounds_their_medians(tmp_path: Path) -> None:
    lines = [
        f"1\t1\t{wrk_line(1000, p50=2.0, p99=6.0)}",
        f"1\t2\t{wrk_line(1800, p50=1.0, p99=5.0)}",
        f"2\t1\t{wrk_line(1200, p50=1.8, p99=8.0)}",
        f"2\t2\t{wrk_line(1700, p50=1.2, p99=4.0, non2xx=3, socket_errors=1)}",
        f"3\t1\t{wrk_line(1100, p50=1.9, p99=7.0)}",
    ]
    (tmp_path / "workers.tsv").write_text("\n".join(lines) + "\n")
    points = plot_data.read_worker_sweep(tmp_path)
    assert points[3] == plot_data.WorkerPoint(round=2, workers=2, rps=1700.0, p50_ms=1.2, p99_ms=4.0, failures=4)
    one, two = plot_data.summarise_workers(points)
    assert one == plot_data.WorkerSummary(1, 1100.0, 1.9, 7.0, 0, (1000.0, 1200.0, 1100.0))
    assert two == plot_data.WorkerSummary(2, 1750.0, 1.1, 4.5, 4, (1800.0, 1700.0))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1\t2", "expected ROUND, WORKERS and a wrk summary"),
        ("1\t2\tRunning 10s test", "not a JSON wrk summary"),
        ('1\t2\t{"requests": 1, "rps": 1.0}', "lacks p50_ms, p99_ms, non2xx, socket_errors"),
    ],
)
def test_a_worker_sweep_line_that_is_not_a_run_is_refused(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "workers.tsv").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        plot_data.read_worker_sweep(tmp_path)


def peers_summary() -> dict:
    runs = [
        peer_results.parse_line(f"{number}\t{server}\t{texts}\t{wrk_line(rps, p99=p99)}")
        for number, server, texts, rps, p99 in [
            (1, "mlserver", "unique", 500, 28.0),
            (1, "falcon-svc", "unique", 2500, 15.0),
            (2, "falcon-svc", "unique", 2000, 19.0),
            (2, "mlserver", "unique", 500, 29.0),
            (1, "mlserver", "repeated", 480, 30.0),
            (1, "falcon-svc", "repeated", 6000, 9.0),
        ]
    ]
    return peer_results.summary(runs)


def test_the_peers_summary_reads_back_for_the_plot(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(peers_summary()))
    summary = plot_data.read_peers(tmp_path)
    assert summary["ratios"]["unique"] == {"median": 4.5, "rounds": [5.0, 4.0], "target": 8.0}
    assert summary["ratios"]["repeated"]["median"] == 12.5
    (tmp_path / "summary.json").write_text('{"series": []}')
    with pytest.raises(ValueError, match="lacks 'ratios'"):
        plot_data.read_peers(tmp_path)


# --- the PNGs ---------------------------------------------------------------------------


def small_results(root: Path) -> dict[str, Path]:
    """Write a small results directory of each kind under `root`."""
    load, workers, peers = root / "load", root / "workers", root / "peers"
    write_meta(load, kind="load", url="http://127.0.0.1:8000", duration="30s")
    for rate, p99, crossed in ((100, 5.0, False), (200, 9.0, False), (400, 80.0, True)):
        summary = k6_summary(http_reqs={"rate": rate * 0.99}, http_req_duration={"p(99)": p99})
        summary["metrics"]["http_req_duration"]["thresholds"]["p(99)<50"] = crossed
        (load / f"k6-{rate}.json").write_text(json.dumps(summary))
    (load / "runs.tsv").write_text("100\t0\tk6-100.json\n200\t0\tk6-200.json\n400\t99\tk6-400.json\n")
    write_meta(workers, kind="workers", connections="8", threads="1", duration_s="10", rounds="1")
    (workers / "workers.tsv").write_text(f"1\t1\t{wrk_line(1500)}\n1\t2\t{wrk_line(2600)}\n1\t4\t{wrk_line(2500)}\n")
    write_meta(peers, kind="peers", mlserver="1.7.1", connections="8", threads="1", duration_s="10", rounds="2")
    (peers / "summary.json").write_text(json.dumps(peers_summary()))
    return {"load": load, "workers": workers, "peers": peers}


def test_each_plot_is_a_png_of_the_standard_size(plot: ModuleType, tmp_path: Path) -> None:
    dirs = small_results(tmp_path)
    out = tmp_path / "out"
    written = plot.render(out, dirs["load"], dirs["workers"], dirs["peers"])
    assert [path.name for path in written] == [plot.LOAD_PNG, plot.WORKERS_PNG, plot.PEERS_PNG]
    expected = (round(plot.FIGURE_SIZE[0] * plot.DPI), round(plot.FIGURE_SIZE[1] * plot.DPI))
    assert expected == (1000, 600)
    for path in written:
        assert png_size(path) == expected, f"{path.name} is {png_size(path)}, not {expected}"
        assert path.stat().st_size > 10_000, f"{path.name} is {path.stat().st_size} bytes: is anything drawn?"


def test_each_title_names_the_machine_and_the_date(plot: ModuleType, tmp_path: Path) -> None:
    write_meta(tmp_path)
    figure = plot.new_figure("what", plot_data.read_meta(tmp_path), "wrk -c8")
    assert figure.get_suptitle() == "what\nbench: 2 cores (Test CPU), 2026-12-02 09:15 UTC; wrk -c8"


def test_the_command_renders_what_it_is_given_and_refuses_bad_results(
    plot: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dirs = small_results(tmp_path)
    assert plot.main(["--out", str(tmp_path / "out"), "--workers", str(dirs["workers"])]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / plot.WORKERS_PNG)]
    assert not (tmp_path / "out" / plot.LOAD_PNG).exists()
    (dirs["load"] / "runs.tsv").write_text("100\t0\n")
    assert plot.main(["--out", str(tmp_path / "out"), "--load", str(dirs["load"])]) == 1
    assert "expected RATE, EXIT and FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main(["--out", str(tmp_path / "out")])
    assert "give at least one of --load, --workers, --peers" in capsys.readouterr().err


# --- sweep_load.sh against a real service ---------------------------------------------------


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory, dummy_model_dir: Path) -> Iterator[str]:
    """A real gunicorn master (degraded: no Redis, no PostgreSQL) for the load sweeps."""
    tmp_path = tmp_path_factory.mktemp("plots-service")
    port = free_port()
    with running_service(service_env(dummy_model_dir, port, tmp_path), tmp_path / "service.log"):
        yield f"http://127.0.0.1:{port}"


def sweep_load(k6: str, results: Path, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("LOAD_", "K6_", "RATES"))}
    clean.pop("FALCON_API_KEY", None)
    settings = {"K6": k6, "RESULTS_DIR": str(results), "LOAD_DURATION": "2s", "LOAD_MAX_VUS": "2"}
    return subprocess.run(
        ["bash", str(PLOTS / "sweep_load.sh"), url],
        env=clean | settings | env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.integration
def test_the_load_sweep_keeps_a_k6_summary_per_rate(k6: str, service_url: str, tmp_path: Path) -> None:
    result = sweep_load(k6, tmp_path / "r", service_url, RATES="10 20", **HOLDS)
    assert result.returncode == 0, result.stdout + result.stderr
    points = plot_data.read_load_sweep(tmp_path / "r")
    assert [(p.offered_rps, p.exit_status, p.crossed) for p in points] == [(10, 0, ()), (20, 0, ())]
    for point in points:
        assert point.requests >= point.offered_rps, f"{point.offered_rps}/s for 2 s sent only {point.requests}"
        assert 0 < point.p50_ms <= point.p95_ms <= point.p99_ms, point
    assert plot_data.knee(points) is None
    assert plot_data.read_meta(tmp_path / "r")["settings"]["rates"] == "10 20"
    assert "20/s: " in result.stdout and "thresholds held" in result.stdout, result.stdout


@pytest.mark.integration
def test_a_rate_past_the_knee_is_recorded_and_the_sweep_goes_on(k6: str, service_url: str, tmp_path: Path) -> None:
    result = sweep_load(k6, tmp_path, service_url, RATES="10 20", **BREAKS)
    assert result.returncode == 0, f"a crossed threshold must not fail the sweep:\n{result.stdout}{result.stderr}"
    points = plot_data.read_load_sweep(tmp_path)
    assert [p.exit_status for p in points] == [99, 99], "both rates must have run, each exiting 99"
    assert all("http_req_duration: p(99)<0.001" in p.crossed for p in points), [p.crossed for p in points]
    assert plot_data.knee(points) == points[0]
    assert "thresholds crossed: http_req_duration: p(99)<0.001" in result.stdout, result.stdout


def test_a_failure_that_is_not_a_threshold_stops_the_sweep(k6: str, tmp_path: Path) -> None:
    # Nothing listens: k6's setup fails (exit 107) on the first rate; the second never runs.
    result = sweep_load(k6, tmp_path, f"http://127.0.0.1:{free_port()}", RATES="10 20")
    assert result.returncode == 107, result.stdout + result.stderr
    assert "the run at 10/s failed (exit 107), not at a threshold; stopping" in result.stderr, result.stderr
    assert (tmp_path / "runs.tsv").read_text() == ""
    assert not (tmp_path / "k6-20.log").exists(), "the sweep went on after a broken run"


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ("  ", "RATES is empty"),
        ("10 5", "RATES must ascend: 5 after 10"),
        ("0", "'0' is not a whole number of requests/s from 1 to 100000"),
        ("100 2e3", "'2e3' is not a whole number"),
        ("200000", "'200000' is not a whole number"),
        (" ".join(str(n) for n in range(1, 22)), "RATES has 21 rates; at most 20"),
    ],
)
def test_the_load_sweep_refuses_bad_rates_before_any_load(k6: str, tmp_path: Path, rates: str, message: str) -> None:
    result = sweep_load(k6, tmp_path / "r", "http://127.0.0.1:9", RATES=rates)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "r").exists(), "a refused sweep left a results directory"


# --- sweep_workers.sh -----------------------------------------------------------------------


def sweep_workers_command(model_dir: Path, results: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    clean = {key: value for key, value in os.environ.items() if key not in {"REDIS_URL", "DATABASE_URL", "WORKERS"}}
    settings = {"MODEL_DIR": str(model_dir), "RESULTS_DIR": str(results), "WARMUP": "0", "CONNECTIONS": "2"}
    return ["bash", str(PLOTS / "sweep_workers.sh")], clean | settings | env


def master_pids(output: str) -> list[int]:
    return [int(line.rsplit("master pid ", 1)[1].rstrip(")")) for line in output.splitlines() if "master pid " in line]


@pytest.mark.integration
def test_the_worker_sweep_records_each_count_and_stops_each_server(dummy_model_dir: Path, tmp_path: Path) -> None:
    require_tool("wrk", "wrk")
    command, env = sweep_workers_command(dummy_model_dir, tmp_path, WORKER_COUNTS="1 2", DURATION="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    pids = master_pids(result.stdout)
    left = survivors(pids)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(pids) == 2, result.stdout
    assert not left, f"sweep_workers.sh left the masters {left} of {pids} running"
    points = plot_data.read_worker_sweep(tmp_path)
    assert [(p.round, p.workers) for p in points] == [(1, 1), (1, 2)]
    assert all(p.rps > 0 and p.failures == 0 for p in points), points
    # Each server ran the count it was given: its workers each logged "worker ready".
    for count in (1, 2):
        readies = (tmp_path / f"server-1-{count}.log").read_text().count("worker ready")
        assert readies == count, f"WORKERS={count} started {readies} workers"


@pytest.mark.integration
def test_the_worker_sweep_stops_its_server_when_stopped(dummy_model_dir: Path, tmp_path: Path) -> None:
    require_tool("wrk", "wrk")
    command, env = sweep_workers_command(dummy_model_dir, tmp_path, WORKER_COUNTS="1", DURATION="300")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        lines = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "measuring WORKERS=1" in line:
                break
        pids += master_pids("".join(lines))
        assert len(pids) == 1 and alive(pids[0]), "".join(lines) + process.stderr.read()
        process.send_signal(signal.SIGTERM)
        # Bounded: a sweep that waited for its 300 s wrk run would fail here.
        assert process.wait(timeout=60) == 143
    finally:
        if process.poll() is None:
            # The sweep and whatever it started (timeout(1) puts wrk in a group of its own).
            for pid in [*descendants(process.pid), process.pid]:
                os.kill(pid, signal.SIGKILL)
            process.wait()
        left = survivors(pids)
    assert not left, "SIGTERM to sweep_workers.sh left the falcon-svc master running"
    assert not (tmp_path / "workers.tsv").read_text(), "an interrupted run was recorded"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_COUNTS": "0"}, "WORKER_COUNTS='0' must be a whole number from 1 to 32"),
        ({"WORKER_COUNTS": "1 2 3 4 5 6 7 8 9"}, "WORKER_COUNTS must name 1 to 8 counts"),
        ({"DURATION": "601"}, "DURATION='601' must be a whole number from 1 to 600"),
        ({"ROUNDS": "x"}, "ROUNDS='x' must be a whole number"),
        ({"MODEL_DIR": "/nonexistent"}, "no model in /nonexistent"),
    ],
)
def test_the_worker_sweep_refuses_bad_settings_before_starting_anything(
    dummy_model_dir: Path, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    command, full_env = sweep_workers_command(dummy_model_dir, tmp_path / "r", **env)
    result = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()
