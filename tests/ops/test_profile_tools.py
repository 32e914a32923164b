"""The profiling tools (scripts/bench/profile/): top_frames.py's arithmetic, and py-spy on real processes.

top_frames.py turns py-spy's collapsed stacks into the tables of
docs/PERFORMANCE_NOTES.md, so its counts are checked to the sample on small inputs:
self time at the leaf, inclusive time once per stack, the leaf-most layer.
profile_workers.sh is run once against a real gunicorn master (degraded: no Redis,
no PostgreSQL) under a small load, through its "remote host" path (SSH="bash -c"),
which copies py-spy in with `cat` as it does over ssh.

py-spy comes from requirements-profile.lock (the PyPI wheel carries the binary;
`make venv`, and so `make test` and `make profile`, puts it at .venv/bin/py-spy). Under CI or FALCON_REQUIRE_TOOLS=1 a
missing py-spy fails these tests instead of skipping them (tests/tools.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port
from tools import require_venv_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE = REPO_ROOT / "scripts" / "bench" / "profile"
sys.path.insert(0, str(PROFILE))
# running_service/service_env live beside the integration tests; pytest puts that
# directory on sys.path only when it collects it.
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))

import top_frames  # noqa: E402
from test_gunicorn_serving import running_service, service_env  # noqa: E402
from top_frames import NO_PYTHON, NO_PYTHON_FRAME, OTHER, Frame, Stack  # noqa: E402

REDIS = "redis client (redis-py, cache.py, idempotency.py)"
JSON = "json"
LOGGING = "logging/journal (the access line too)"
FALCON = "falcon (routing, middleware, media)"
MODEL = "model (sklearn, numpy, scipy, our scorer)"
OURS = "our resources and services"
SERVER = "server (gunicorn/meinheld)"

COLLAPSED = """\
<module> (app.py:3);handle (falcon/app.py:365);on_post (falcon_svc/resources/infer.py:28);predict (sklearn/base.py:10) 6
<module> (app.py:3);handle (falcon/app.py:365);on_post (falcon_svc/resources/infer.py:30);dumps (json/__init__.py:231) 3
<module> (app.py:3);handle (falcon/app.py:366) 1

 2
"""


def frames(*texts: str) -> tuple[Frame, ...]:
    return tuple(top_frames.parse_frame(text) for text in texts)


def test_collapsed_lines_parse_into_stacks_root_first_with_their_counts() -> None:
    stacks = top_frames.parse_collapsed(COLLAPSED.splitlines())

    assert [stack.count for stack in stacks] == [6, 3, 1, 2], "one stack per non-blank line, with its count"
    assert stacks[0].frames[-1] == Frame("predict", "sklearn/base.py", 10), "the last frame is the leaf"
    assert stacks[0].frames[0] == Frame("<module>", "app.py", 3), "the first frame is the root"
    assert stacks[3].frames == (), "py-spy's ' 2' (a thread running with no Python frame) is an empty stack"


@pytest.mark.parametrize(
    ("text", "frame", "location"),
    [
        ("run (gunicorn/arbiter.py:12)", Frame("run", "gunicorn/arbiter.py", 12), "run (gunicorn/arbiter.py:12)"),
        ("f (g) (x.py:3)", Frame("f (g)", "x.py", 3), "f (g) (x.py:3)"),
        ("native (libfoo.so)", Frame("native", "libfoo.so", None), "native (libfoo.so)"),
        ('process 12:"python x.py"', Frame('process 12:"python x.py"', "", None), 'process 12:"python x.py"'),
    ],
)
def test_a_frame_keeps_function_file_and_line(text: str, frame: Frame, location: str) -> None:
    parsed = top_frames.parse_frame(text)

    assert parsed == frame
    assert parsed.location == location, "a frame is shown as py-spy wrote it"


@pytest.mark.parametrize("line", ["a (x.py:1);b (y.py:2)", "a (x.py:1) many", "12x"])
def test_a_malformed_line_is_refused_naming_file_and_line(line: str) -> None:
    with pytest.raises(ValueError, match=r"^w1\.txt:2: not 'frame;frame;\.\.\. COUNT'"):
        top_frames.parse_collapsed(["a (x.py:1) 1", line], source="w1.txt")


def test_self_time_goes_to_the_leaf_and_inclusive_time_once_per_stack() -> None:
    stacks = [
        Stack(frames("main (m.py:1)", "f (m.py:5)", "f (m.py:9)", "g (m.py:20)"), 4),  # f recursing
        Stack(frames("main (m.py:1)", "f (m.py:6)"), 3),
        Stack(frames("main (m.py:2)", "g (m.py:21)"), 2),
        Stack((), 1),
        Stack(frames("Arbiter.run (gunicorn/arbiter.py:230)", "MeinheldWorker.run (falcon_svc/workers.py:217)"), 5),
    ]

    profile = top_frames.aggregate(stacks)

    assert profile.total == 15
    assert profile.by_self == {
        "g (m.py:20)": 4, "f (m.py:6)": 3, "g (m.py:21)": 2, NO_PYTHON_FRAME: 1,
        "MeinheldWorker.run (falcon_svc/workers.py:217)": 5,
    }  # fmt: skip
    assert profile.by_inclusive == {"main (m.py)": 9, "f (m.py)": 7, "g (m.py)": 6}, (
        "inclusive time is per function (any line), counts a recursive function once per sample,"
        " and leaves the server's root chain out"
    )
    by_function = top_frames.aggregate(stacks, by_function=True)
    assert by_function.by_self == {
        "g (m.py)": 6, "f (m.py)": 3, NO_PYTHON_FRAME: 1, "MeinheldWorker.run (falcon_svc/workers.py)": 5,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("file", "layer"),
    [
        ("gunicorn/arbiter.py", SERVER),
        ("falcon_svc/workers.py", SERVER),
        ("falcon/routing/compiled.py", FALCON),
        ("falcon_svc/middleware/context.py", "our middleware"),
        ("falcon_svc/auth/middleware.py", "our middleware"),
        ("json/encoder.py", JSON),
        ("redis/connection.py", REDIS),
        ("falcon_svc/cache.py", REDIS),
        ("prometheus_client/values.py", "metrics (prometheus_client)"),
        ("falcon_svc/metrics.py", "metrics (prometheus_client)"),
        ("falcon_svc/requestlog/queue.py", "request log (rows, queue, psycopg)"),
        ("psycopg/cursor.py", "request log (rows, queue, psycopg)"),
        ("sklearn/base.py", MODEL),
        ("numpy/core/fromnumeric.py", MODEL),
        ("falcon_svc/model/scorer.py", MODEL),
        ("logging/__init__.py", LOGGING),
        ("falcon_svc/journal.py", LOGGING),
        ("falcon_svc/inference.py", OURS),
        ("falcon_svcx/other.py", None),
        ("socket.py", None),
        ("threading.py", None),
    ],
)
def test_each_file_falls_in_its_layer(file: str, layer: str | None) -> None:
    assert top_frames.layer_of(Frame("f", file, 1)) == layer


@pytest.mark.parametrize(
    ("frame", "layer"),
    [
        # The access line: gunicorn's atoms and our meinheld adapter are logging, not server.
        ("Logger.access (gunicorn/glogging.py:391)", LOGGING),
        ("MeinheldLogAdapter.access (falcon_svc/workers.py:122)", LOGGING),
        ("MeinheldLogAdapter.access.<locals>.<listcomp> (falcon_svc/workers.py:116)", LOGGING),
        ("_LoggedResponse.__init__ (falcon_svc/workers.py:134)", LOGGING),
        ("MeinheldWorker.run (falcon_svc/workers.py:217)", SERVER),
        ("ServiceApplication.run (falcon_svc/systemd.py:120)", SERVER),
        ("main (falcon_svc/cli.py:200)", SERVER),
        ("<module> (falcon-svc)", SERVER),
        ("Arbiter.run (gunicorn/arbiter.py:230)", SERVER),
        ("MeinheldLogAdapter.access (falcon_svc/other.py:1)", OURS),
    ],
)
def test_a_function_pattern_takes_part_of_a_file_into_another_layer(frame: str, layer: str) -> None:
    assert top_frames.layer_of(top_frames.parse_frame(frame)) == layer


def test_a_sample_counts_for_its_leaf_most_layer_and_for_every_layer_on_its_stack() -> None:
    handler = ("App.__call__ (falcon/app.py:487)", "on_post (falcon_svc/resources/infer.py:28)")
    stacks = [
        # A socket read under redis-py: the standard library has no layer, the caller's counts.
        Stack(frames(*handler, "get (redis/client.py:10)", "recv_into (socket.py:706)"), 5),
        # The access line's JSON: "json" by self time, "logging/journal" inclusive too.
        Stack(frames(*handler, "emit (falcon_svc/logs.py:80)", "dumps (json/__init__.py:231)"), 3),
        # Only the standard library.
        Stack(frames("_bootstrap (threading.py:1002)", "wait (threading.py:331)"), 2),
        Stack((), 10),
    ]

    profile = top_frames.aggregate(stacks)

    assert profile.layer_self == {REDIS: 5, JSON: 3, OTHER: 2, NO_PYTHON: 10}
    assert profile.layer_inclusive == {
        FALCON: 8, OURS: 8, REDIS: 5, LOGGING: 3, JSON: 3, OTHER: 2, NO_PYTHON: 10,
    }  # fmt: skip


def test_the_report_is_markdown_tables_of_percentages_of_all_samples() -> None:
    profile = top_frames.aggregate(top_frames.parse_collapsed(COLLAPSED.splitlines()))

    report = top_frames.render(profile, top=2, sources=["w1.txt"])

    assert report.startswith("Samples: 12 from 1 file(s): w1.txt")
    self_rows = [
        line for line in report.split("### Top 2 functions by inclusive time")[0].splitlines() if line.startswith("| ")
    ]
    assert self_rows[1:] == [
        "| 1 | 50.0% | 6 | `predict (sklearn/base.py:10)` |",
        "| 2 | 25.0% | 3 | `dumps (json/__init__.py:231)` |",
    ], "the top self frames, most samples first, as many as --top"
    assert "| 1 | 83.3% | 10 | `<module> (app.py)` |" in report
    layers = report.split("### By layer")[1]
    assert f"| {NO_PYTHON} | 16.7% | 16.7% |" in layers
    assert f"| {MODEL} | 50.0% | 50.0% |" in layers
    assert f"| {FALCON} | 8.3% | 83.3% |" in layers
    assert "metrics" not in layers, "a layer without samples gets no row"


def test_ties_rank_in_name_order_whatever_order_they_were_counted_in() -> None:
    counts = Counter({"b (x.py)": 2, "a (x.py)": 2, "c (x.py)": 3, "d (x.py)": 1})

    assert top_frames.ranked(counts, 3) == [("c (x.py)", 3), ("a (x.py)", 2), ("b (x.py)", 2)]


def test_a_pipe_in_a_function_name_does_not_break_the_table() -> None:
    assert top_frames.cell("a|b `c`") == "`a\\|b 'c'`"


def run_top_frames(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROFILE / "top_frames.py"), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_command_adds_up_several_workers_files(tmp_path: Path) -> None:
    (tmp_path / "w1.txt").write_text("a (x.py:1);b (x.py:2) 3\n")
    (tmp_path / "w2.txt").write_text("a (x.py:1);b (x.py:2) 1\na (x.py:1) 3\n")

    result = run_top_frames("--top", "5", str(tmp_path / "w1.txt"), str(tmp_path / "w2.txt"))

    assert result.returncode == 0, result.stderr
    assert "Samples: 7 from 2 file(s): w1.txt, w2.txt" in result.stdout
    assert "| 1 | 57.1% | 4 | `b (x.py:2)` |\n| 2 | 42.9% | 3 | `a (x.py:1)` |" in result.stdout
    assert "| 1 | 100.0% | 7 | `a (x.py)` |" in result.stdout


def test_the_command_refuses_a_malformed_or_empty_input(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("a (x.py:1) 1\nnot a stack\n")
    (tmp_path / "empty.txt").write_text("\n")

    bad = run_top_frames(str(tmp_path / "bad.txt"))
    empty = run_top_frames(str(tmp_path / "empty.txt"))
    missing = run_top_frames(str(tmp_path / "missing.txt"))

    assert (bad.returncode, bad.stdout) == (2, ""), bad.stderr
    assert "bad.txt:2: not 'frame;frame;... COUNT'" in bad.stderr
    assert (empty.returncode, empty.stdout) == (1, "")
    assert "no samples" in empty.stderr
    assert missing.returncode == 2
    assert "missing.txt" in missing.stderr


# --- py-spy itself ---------------------------------------------------------------


@pytest.fixture(scope="session")
def py_spy() -> str:
    """Return the py-spy binary: the venv's (requirements-profile.lock), else PATH's."""
    return require_venv_tool("py-spy", "requirements-profile.lock")


def test_py_spy_is_pinned_by_hash_and_the_installed_binary_is_that_version(py_spy: str) -> None:
    lock = (REPO_ROOT / "requirements-profile.lock").read_text()
    pinned = re.search(r"^py-spy==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.MULTILINE)
    assert pinned, "requirements-profile.lock must pin py-spy with sha256 hashes"
    pins = [line for line in (REPO_ROOT / "requirements-profile.txt").read_text().splitlines() if line[:1].isalnum()]
    assert pins == [f"py-spy=={pinned[1]}"], f"requirements-profile.txt must pin exactly the locked py-spy: {pins}"
    others = re.findall(r"^(?!py-spy==)[A-Za-z0-9][^\s=]*==", lock, re.MULTILINE)
    assert not others, f"requirements-profile.lock is installed with --no-deps and holds more than py-spy: {others}"

    version = subprocess.run([py_spy, "--version"], capture_output=True, text=True, timeout=30, check=True)

    assert version.stdout.split() == ["py-spy", pinned[1]], f"installed {version.stdout!r}, locked {pinned[1]}"


# A process that spins in a function of a known name until told to stop (stdin closes),
# so py-spy has something to catch; it says when it is spinning.
SPINNER = """
import sys, threading

stop = threading.Event()

def spin_in_a_known_function():
    total = 0
    while not stop.is_set():
        total += sum(i * i for i in range(1000))

threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("spinning", flush=True)
spin_in_a_known_function()
"""


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "spinning\n"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


def test_py_spy_records_a_running_process_in_the_format_top_frames_reads(
    py_spy: str, spinner: subprocess.Popen[str], tmp_path: Path
) -> None:
    raw = tmp_path / "spinner.txt"

    result = subprocess.run(
        [py_spy, "record", "--pid", str(spinner.pid), "--rate", "200", "--duration", "1",
         "--format", "raw", "--nonblocking", "--output", str(raw)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, f"py-spy failed (ptrace needs root or CAP_SYS_PTRACE): {result.stderr}"
    profile = top_frames.aggregate(top_frames.parse_collapsed(raw.read_text().splitlines()))
    assert profile.total > 0, f"py-spy recorded no sample: {result.stdout}{result.stderr}"
    assert "spin_in_a_known_function (<string>)" in profile.by_inclusive, f"the spinning function: {profile.by_self}"
    spinning = profile.by_inclusive["spin_in_a_known_function (<string>)"]
    assert spinning > profile.total / 2, f"the process mostly spins, py-spy saw {spinning} of {profile.total}"


# --- profile_workers.sh -------------------------------------------------------------

# The load of the script test: one connection, unique texts, for a bounded time.
LOAD = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
end, sent = time.monotonic() + seconds, 0
while time.monotonic() < end:
    sent += 1
    body = json.dumps({"text": f"The parcel number {sent} arrived on time and intact."}).encode()
    request = urllib.request.Request(url + "/infer", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
print(f"sent {sent} requests")
"""


def run_profiler(*load: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key not in {"SSH", "URL", "LOAD_CMD", "OUT"}}
    return subprocess.run(
        ["bash", str(PROFILE / "profile_workers.sh"), *load],
        capture_output=True, text=True, timeout=180, check=False, env=environment | env,
    )  # fmt: skip


def test_profile_workers_records_every_worker_under_load_and_summarises(
    py_spy: str, dummy_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    out = tmp_path / "profile"
    before = set(Path("/tmp").glob("falcon-profile.*"))
    env = service_env(dummy_model_dir, port, tmp_path)
    with running_service(env, tmp_path / "service.log") as master:
        workers = sorted(Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split())
        result = run_profiler(
            sys.executable, "-c", LOAD, f"http://127.0.0.1:{port}", "8",
            MASTER_PIDS=str(master.pid), SSH="bash -c", PY_SPY=py_spy, PYTHON=sys.executable,
            DURATION="2", WARMUP="1", RATE="100", OUT=str(out),
        )  # fmt: skip

    assert result.returncode == 0, f"profile_workers.sh failed: {result.stdout}{result.stderr}"
    assert len(workers) == 2
    for pid in workers:
        label = f"master{master.pid}-{pid}"
        svg = (out / f"{label}.svg").read_text()
        assert svg.startswith("<?xml") and "<svg" in svg, f"{label}.svg is not a flame graph: {svg[:200]}"
        stacks = top_frames.parse_collapsed((out / f"{label}.txt").read_text().splitlines())
        assert sum(stack.count for stack in stacks) > 0, f"no samples of worker {pid}"
    profile = top_frames.aggregate(
        stack for pid in workers for stack in top_frames.parse_collapsed((out / f"master{master.pid}-{pid}.txt").open())
    )
    assert "InferResource.on_post (falcon_svc/resources/infer.py)" in profile.by_inclusive, (
        f"the workers were sampled but not while serving /infer: {profile.by_inclusive.most_common(10)}"
    )
    # py-spy leaves out idle threads: the service's background threads (request log,
    # probes) wait nearly all the time and would otherwise outweigh the request path.
    background = profile.by_inclusive["Thread._bootstrap (threading.py)"]
    assert background < profile.total / 2, f"idle threads were sampled: {background} of {profile.total} samples"
    report = (out / "profile.md").read_text()
    assert "sent " in (out / "load.out").read_text(), "the load's output is kept"
    assert "- sampling: 2 worker(s), py-spy" in report
    assert re.search(r"- workers CPU while sampled: \d+\.\d\d s in \d+\.\d s of wall time", report), report
    spy_cpu = re.search(r"- py-spy's own CPU \(user, system\): (\d+)m(\d+\.\d+)s (\d+)m(\d+\.\d+)s\n", report)
    assert spy_cpu, report
    minutes_user, seconds_user, minutes_system, seconds_system = map(float, spy_cpu.groups())
    assert 60 * (minutes_user + minutes_system) + seconds_user + seconds_system > 0, "the samplers' CPU was not counted"
    assert "### By layer" in report and "| model (sklearn, numpy, scipy, our scorer) |" in report
    assert report in result.stdout, "the summary is printed too"
    assert "py-spy" not in {path.name for path in out.iterdir()}, "the copied binary stays behind"
    assert set(Path("/tmp").glob("falcon-profile.*")) <= before, "the host's temporary directory is removed"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DURATION": "0"}, "DURATION must be a whole number of seconds > 0, got '0'"),
        ({"RATE": "fast"}, "RATE must be a whole number of samples per second > 0, got 'fast'"),
        ({"WARMUP": "-1"}, "WARMUP must be a whole number of seconds, got '-1'"),
        ({"MASTER_PIDS": "1"}, "no load: give a command, LOAD_CMD, or URL"),
        ({"PY_SPY": "/nonexistent/py-spy"}, "py-spy not found at /nonexistent/py-spy"),
    ],
)
def test_profile_workers_refuses_a_bad_setting_before_any_load(env: dict[str, str], message: str) -> None:
    result = run_profiler(**({"PY_SPY": sys.executable} | env))

    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_profile_workers_refuses_a_master_without_workers(tmp_path: Path) -> None:
    marker = tmp_path / "load-ran"
    with subprocess.Popen(["sleep", "60"]) as childless:
        try:
            result = run_profiler("touch", str(marker), MASTER_PIDS=str(childless.pid), PY_SPY=sys.executable)
        finally:
            childless.kill()

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no gunicorn workers found (MASTER_PIDS='{childless.pid}'" in result.stderr
    assert not marker.exists(), "no load runs when there is nothing to profile"
    assert result.stdout == ""
