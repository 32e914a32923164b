"""scripts/run_runbook.py: the runbook's blocks are found, tagged, run and judged.

The runner itself runs on the end-to-end host (scripts/e2e_checks.sh). Here it runs its
blocks on this machine, the "host" being a local bash (directly, or through a stand-in
for ssh), with harmless sample Markdown; the docs' own PromQL goes to a real Prometheus
that has loaded our rules; every shell block of the docs must parse as bash.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port, stop_process
from tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER_PATH = REPO_ROOT / "scripts" / "run_runbook.py"
RULE_FILES = sorted((REPO_ROOT / "prometheus" / "rules").glob("*.yml"))


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_runbook", RUNNER_PATH)
    assert spec and spec.loader, f"cannot load {RUNNER_PATH}"
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_runbook"] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()

SAMPLE = """\
# A sample runbook

```sh
systemctl status falcon-worker@PORT   # a trailing comment
curl -s http://127.0.0.1:PORT/readyz \\
  -H 'X-Request-ID: <id>'
# a comment line
for p in 8001 8002; do
  echo "$p"
done
```

```sh destructive
systemctl restart falcon-worker@8001
```

```sh controller
ssh root@HOST 'bash -s' < scripts/check_health.sh
```

```promql
up{job="falcon"}
sum(rate(falcon_http_requests_total[5m]))
```

```yaml
falcon_svc_workers: 3
```

1. In a list item:

   ```sh
   echo "in a list"
   ```

Prose with `rate(falcon_cache_errors_total[5m])` and `redis_up == 0`, but not
`falcon_svc_workers` nor `falcon-worker@PORT`.
"""


def run_runner(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNNER_PATH), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def write(tmp_path: Path, text: str, name: str = "sample.md") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- Extraction ---------------------------------------------------------------------------


def test_blocks_are_found_with_their_tags_and_lines() -> None:
    blocks = runner.parse_blocks(SAMPLE, "sample.md")
    kinds = [(block.kind, block.line) for block in blocks]
    assert kinds == [
        ("sh", 4),
        ("destructive", 14),
        ("controller", 18),
        ("promql", 22),
        ("yaml", 27),
        ("sh", 33),
    ], kinds
    assert blocks[-1].lines == ['echo "in a list"'], "an indented fence's lines must lose the list indent"


def test_commands_join_continuations_and_drop_comments() -> None:
    block = runner.parse_blocks(SAMPLE, "sample.md")[0]
    assert runner.commands(block) == [
        (4, "systemctl status falcon-worker@PORT"),
        (5, "curl -s http://127.0.0.1:PORT/readyz -H 'X-Request-ID: <id>'"),
        (8, "for p in 8001 8002; do"),
        (9, 'echo "$p"'),
        (10, "done"),
    ]
    assert runner.strip_comment("grep -E '#[0-9]+' file  # why") == "grep -E '#[0-9]+' file", "a quoted # is no comment"


def test_placeholders_get_sane_values_and_nothing_else_changes() -> None:
    text = "curl :PORT/x; echo $PORT ${PORT} REDIS_PORT PORTS ssh root@HOST; journalctl REQUEST_ID=<id>"
    assert runner.substitute(text) == (
        "curl :8001/x; echo $PORT ${PORT} REDIS_PORT PORTS ssh root@127.0.0.1; "
        "journalctl REQUEST_ID=runbook-runner-no-such-request"
    )


def test_promql_comes_from_promql_blocks_and_inline_expressions() -> None:
    found = [expr for _, expr in runner.promql_expressions(SAMPLE, "sample.md")]
    assert found == [
        'up{job="falcon"}',
        "sum(rate(falcon_http_requests_total[5m]))",
        "rate(falcon_cache_errors_total[5m])",
        "redis_up == 0",
    ], found


# --- The docs -----------------------------------------------------------------------------


def doc_blocks() -> list:
    return [block for path in runner.DOCS for block in runner.parse_blocks(path.read_text(encoding="utf-8"), path.name)]


def test_the_docs_have_blocks_of_every_kind_and_no_untagged_shell() -> None:
    blocks = doc_blocks()
    kinds = {block.kind for block in blocks}
    assert {"sh", "destructive", "controller", "promql"} <= kinds, kinds
    untagged = [block.where for block in blocks if block.lang == ""]
    assert not untagged, f"fenced blocks without a tag (sh, sh destructive, sh controller, promql, text...): {untagged}"
    for path in runner.DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        # An indented code block: 4+ spaces after a blank line, outside a fence (a list
        # item's continuation starts with a marker or follows its item, not a blank).
        in_fence, indented = False, []
        for number, (previous, line) in enumerate(zip(["", *lines], lines, strict=False), start=1):
            if runner.FENCE.match(line):
                in_fence = not in_fence
            elif not in_fence and line.startswith("    ") and line.strip() and not previous.strip():
                indented.append(f"{path.name}:{number}")
        assert not indented, f"indented code blocks left (fence and tag them): {indented}"


@pytest.mark.parametrize("block", [b for b in doc_blocks() if b.lang == "sh"], ids=lambda b: b.where)
def test_every_shell_block_in_the_docs_parses_as_bash(block) -> None:
    script, _ = runner.block_script(block, "")
    done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{block.where} is not valid bash: {done.stderr}"


def test_every_destructive_block_in_the_docs_has_a_drill_that_exists() -> None:
    done = run_runner("--list")
    assert done.returncode == 0, done.stdout + done.stderr
    destructive = [block for block in doc_blocks() if block.kind == "destructive"]
    assert len(destructive) >= 8, f"expected the restart, roll, restore... blocks, found {len(destructive)}"
    listed = done.stdout.count("covered by: ") + done.stdout.count("no drill: ")
    assert listed == len(destructive), done.stdout
    for drills in runner.DESTRUCTIVE_DRILLS.values():
        for drill in drills.split():
            assert runner.drill_exists(drill), f"DESTRUCTIVE_DRILLS names {drill}: no such fault script or check"


def test_a_destructive_block_without_a_drill_fails_the_runner(tmp_path: Path) -> None:
    sample = write(tmp_path, "```sh destructive\nsystemctl restart nginx\n```\n")
    done = run_runner("--list", str(sample))
    assert done.returncode == 1, done.stdout
    assert "no drill listed" in done.stdout, done.stdout


# --- Running ------------------------------------------------------------------------------

GOOD = """\
```sh
echo "port PORT" \\
  | grep -q 'port 8001'
for p in 1 2; do
  test "$p" -gt 0
done
printf '%s\\n' '{"a": 1}' | python3 -m json.tool
read -r line || true   # stdin is empty, not the rest of the script
echo after-the-read
```
"""

BROKEN = """\
```sh
echo ok
```

```sh
echo fine
ls /nonexistent-runbook-runner-path   # line 7: fails
echo not reached
```
"""


@pytest.mark.parametrize("transport", [[], ["--ssh", "sh -c"]], ids=["local", "through-a-stand-in-for-ssh"])
def test_good_blocks_pass(tmp_path: Path, transport: list[str]) -> None:
    done = run_runner("--no-promql", *transport, str(write(tmp_path, GOOD)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout and "FAIL" not in done.stdout, done.stdout


@pytest.mark.parametrize("transport", [[], ["--ssh", "sh -c"]], ids=["local", "through-a-stand-in-for-ssh"])
def test_a_broken_command_fails_the_runner_and_names_its_line(tmp_path: Path, transport: list[str]) -> None:
    done = run_runner("--no-promql", *transport, str(write(tmp_path, BROKEN)))
    assert done.returncode == 1, done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "sample.md:6" in failed[0], done.stdout
    assert "line 7 exited 2: ls /nonexistent-runbook-runner-path" in failed[0], failed[0]
    assert any(line.startswith("PASS") and "sample.md:2 " in line for line in done.stdout.splitlines()), (
        f"the good block must still pass: {done.stdout}"
    )


def test_a_block_that_hangs_is_cut_off(tmp_path: Path) -> None:
    done = run_runner("--no-promql", "--timeout", "1", str(write(tmp_path, "```sh\nsleep 30\n```\n")))
    assert done.returncode == 1 and "timed out after 1 s" in done.stdout, done.stdout


def test_the_api_key_file_is_exported_not_put_on_a_command_line(tmp_path: Path) -> None:
    key = write(tmp_path, "secret-key-123\n", "key")
    sample = write(tmp_path, '```sh\ntest "$FALCON_API_KEY" = secret-key-123\n```\n')
    assert run_runner("--no-promql", "--api-key-file", str(key), str(sample)).returncode == 0
    assert run_runner("--no-promql", str(sample)).returncode == 1, "without the key file the variable is unset"


# --- PromQL against a real Prometheus -------------------------------------------------------


@contextlib.contextmanager
def prometheus_with_our_rules(directory: Path) -> Iterator[str]:
    """A prometheus on a free loopback port with prometheus/rules/ loaded; yields its URL."""
    binary = require_tool("prometheus", "prometheus")
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(json.dumps({"rule_files": [str(path) for path in RULE_FILES]}), encoding="utf-8")
    log = directory / "prometheus.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={directory / 'data'}"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
                if answer.status == 200:
                    break
            assert time.monotonic() < deadline, f"prometheus not ready in 30 s: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        yield url
    finally:
        stop_process(process)


def test_every_promql_expression_in_the_docs_is_accepted_by_promtool(tmp_path: Path) -> None:
    require_tool("promtool", "prometheus")
    expressions = [item for path in runner.DOCS for item in runner.promql_expressions(path.read_text(), path.name)]
    assert len(expressions) >= 40, f"expected the runbook's PromQL, found {len(expressions)}"
    broken = ("sample.md:1", "sum(rate(falcon_http_requests_total[5m])")
    with prometheus_with_our_rules(tmp_path) as url:
        results = runner.run_promql(runner.Host("", 60), [*expressions, broken], url)
    failed = [f"{where}: {expr} ({verdict})" for where, expr, ok, verdict in results[:-1] if not ok]
    assert not failed, "PromQL promtool refuses:\n" + "\n".join(failed)
    assert not results[-1][2], "an unclosed parenthesis must fail: the check cannot fail otherwise"
