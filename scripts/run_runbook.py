#!/usr/bin/env python3
"""Run the runbook: every read-only command and PromQL expression of the operator docs.

docs/RUNBOOK.md and docs/UBUNTU_DEPLOYMENT.md mark their code blocks by what they are:

  ```sh               read-only commands, safe on a healthy provisioned host: this runs them
  ```sh destructive   commands that change state (restarts, restores): listed, never run here;
                      each must have a drill that exercises it (DESTRUCTIVE_DRILLS below)
  ```sh controller    commands for the controller or a checkout (git, ansible): listed, not run
  ```promql           PromQL, one expression a line: each goes to `promtool query instant`
  anything else       config, output samples, YAML: left alone

Inline PromQL in prose (`rate(...)`, `up{job="falcon"}`, `redis_up == 0`) is checked too.
Each `sh` block runs as one `bash -Eeuo pipefail` script (so a loop or a function spans
lines, and a variable set on one line is seen on the next), under a timeout, with the
placeholders below substituted. A failing block is reported with the doc line of the
command that failed. Exit 1 if any block or expression failed, or a destructive block
names no drill.

Run it ON the host as root, or from the controller through an ssh command:

  scripts/run_runbook.py                                      # on the host (a checkout there)
  scripts/run_runbook.py --ssh 'ssh -p 2222 root@127.0.0.1' --api-key-file /root/.falcon-e2e-api-key
  scripts/run_runbook.py --list                               # what would run, and the drills

Standard library only: it runs wherever python3 is.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
DOCS = [REPO_DIR / "docs" / "RUNBOOK.md", REPO_DIR / "docs" / "UBUNTU_DEPLOYMENT.md"]

# Placeholders the docs use for what the operator picks, and what the runner puts in
# their place: a deployed worker port, the host itself, a request id (finds nothing).
PLACEHOLDERS = {
    "PORT": "8001",
    "HOST": "127.0.0.1",
    "<id>": "runbook-runner-no-such-request",
}

# Each destructive block, by its first command, and the drill that exercises it on every
# `make e2e`: a fault script in scripts/faults/ (NAME.sh), or a function of
# scripts/e2e_checks.sh. A destructive block not listed here fails the run: a new
# procedure needs a drill (or a reason) before it ships.
DESTRUCTIVE_DRILLS = {
    # Worker down: restart one unit and wait until it is active and ready.
    "systemctl reset-failed falcon-worker@PORT": "rolling_restart",
    "systemctl restart falcon-worker@8001": "restart_storm stop_worker",
    # Rolling a new model: import, canary (promoted and rolled back), activate and rollback
    # with --reload, all under load (scripts/e2e_canary.sh, run by check_model_lifecycle).
    "/opt/falcon-svc/venv/bin/falcon-svc models import /root/sentiment-new": "check_model_lifecycle",
    "/opt/falcon-svc/venv/bin/falcon-svc models canary VERSION --ports 8001,8002": "check_model_lifecycle",
    "/opt/falcon-svc/venv/bin/falcon-svc models activate VERSION --reload": "check_model_lifecycle",
    "/opt/falcon-svc/venv/bin/falcon-svc models rollback --reload": "check_model_lifecycle",
    # Restarting the units one by one: the loop over the deployed worker ports.
    "ports=$(systemctl list-units --plain --no-legend 'falcon-worker@*.service'"
    " | grep -o '@[0-9]*' | tr -d @)": "rolling_restart",
    "/opt/falcon-svc/venv/bin/falcon-svc keys revoke client-a --file /etc/falcon-svc/api_keys": "check_api_keys",
    "systemctl start falcon-svc-retention.service": "check_retention",
    "systemctl start falcon-svc-backup.service": "check_backup_restore",
    'q() { runuser -u postgres -- psql -X -At -d falcon -c "$1"; }': "check_backup_restore",
    "pg_restore --list \"$dump\" | grep -E ' request_log[a-z0-9_]*([ .]|$)'"
    " >/tmp/request_log.list": "check_backup_restore",
    # The drills themselves: each runs on every `make e2e` (scripts/e2e_checks.sh run_faults).
    "falcon-faults/stop_worker.sh": "stop_worker restart_storm rolling_restart kill_worker redis_down"
    " postgres_slow postgres_down cpu_spike",
}
# Destructive blocks no drill can exercise, each with the reason. Keep it short: every
# entry is a procedure that runs untested.
WITHOUT_DRILL = {
    "apt-get purge build-essential g++ g++-12 gcc gcc-12 python3-dev python3.11-dev && apt-get autoremove --purge": (
        "a one-time upgrade of hosts installed before the roles stopped installing a compiler; "
        "the e2e host never had one (check_supply_chain asserts that no compiler is there)"
    ),
}

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>.*)$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# Inline PromQL: a metric or recording-rule name with PromQL around it (a call, a
# selector, a range, a comparison), or a recording rule (level:metric:operations).
PROMQL_START = re.compile(
    r"^(?:1 - |sum|avg|max|min|count|rate|increase|deriv|histogram_quantile|max_over_time"
    r"|up\{|(?:falcon|redis|pg|nginx|node)_[a-z0-9_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+)"
)
PROMQL_SYNTAX = re.compile(r"[({\[]|==|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+")
# The runner's own lines in a block's stderr: `@@runbook-failed LINENO EXIT COMMAND`.
FAIL_MARK = re.compile(r"^@@runbook-failed (\d+) (\d+) (.*)$", re.MULTILINE)


@dataclasses.dataclass
class Block:
    """One fenced code block: where it is, its language and tags, its lines."""

    doc: str
    line: int  # the doc line of the block's first content line
    lang: str
    tags: tuple[str, ...]
    lines: list[str]

    @property
    def kind(self) -> str:
        if self.lang != "sh":
            return self.lang
        if "destructive" in self.tags:
            return "destructive"
        if "controller" in self.tags:
            return "controller"
        return "sh"

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def parse_blocks(text: str, doc: str) -> list[Block]:
    """Fenced blocks of a Markdown text; a fence indented in a list item counts too."""
    blocks: list[Block] = []
    current: Block | None = None
    indent = ""
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None:
            if fence:
                words = fence["info"].split()
                lang = words[0] if words else ""
                current = Block(doc, number + 1, lang, tuple(words[1:]), [])
                indent = fence["indent"]
            continue
        if fence and fence["indent"] == indent and not fence["info"].strip():
            blocks.append(current)
            current = None
            continue
        current.lines.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
    return blocks


def strip_comment(line: str) -> str:
    """A shell line without its trailing `# comment` (a # inside quotes stays)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def commands(block: Block) -> list[tuple[int, str]]:
    """The block's command lines (doc line, text): continuations joined, comments dropped."""
    result: list[tuple[int, str]] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.lines):
        line = strip_comment(raw) if not pending else raw.rstrip()
        if not pending:
            start = block.line + offset
            if not line.strip():
                continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        result.append((start, (pending + line.strip()).strip()))
        pending = ""
    if pending:
        result.append((start, pending.strip()))
    return result


def substitute(text: str) -> str:
    """Put a sane value in place of each placeholder (PORT, HOST, <id>)."""
    for name, value in PLACEHOLDERS.items():
        if name.isidentifier():
            # NOTE: never a shell variable of that name ($PORT, ${PORT}).
            text = re.sub(rf"(?<![\w$])(?<!\$\{{){re.escape(name)}(?!\w)", value, text)
        else:
            text = text.replace(name, value)
    return text


def promql_expressions(text: str, doc: str) -> list[tuple[str, str]]:
    """(where, expression) for each `promql` block line and each inline PromQL span."""
    found: list[tuple[str, str]] = []
    for block in parse_blocks(text, doc):
        if block.lang == "promql":
            found += [
                (f"{doc}:{block.line + i}", line.strip())
                for i, line in enumerate(block.lines)
                if line.strip() and not line.lstrip().startswith("#")
            ]
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for span in INLINE_CODE.findall(line):
            if (
                PROMQL_START.match(span)
                and PROMQL_SYNTAX.search(span)
                and "<" not in span
                and " -" not in span.replace("1 - ", "")
            ):
                found.append((f"{doc}:{number}", span))
    return found


class Host:
    """Where commands run: this machine, or the host behind an ssh command."""

    def __init__(self, ssh: str, timeout: float) -> None:
        self.ssh = shlex.split(ssh) if ssh else []
        self.timeout = timeout

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        # NOTE: the script is an argument, not stdin: a command in it that reads stdin
        # (psql, python3 -c ... sys.stdin) must not eat the rest of the script.
        inner = ["timeout", "-k", "5", str(int(self.timeout)), "bash", "-c", script]
        argv = [*self.ssh, shlex.join(inner) + " </dev/null"] if self.ssh else inner
        try:
            return subprocess.run(
                argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.timeout + 30
            )
        except subprocess.TimeoutExpired as ex:
            return subprocess.CompletedProcess(
                argv, 124, str(ex.stdout or ""), f"no answer in {self.timeout + 30:.0f} s"
            )


def block_script(block: Block, api_key_file: str) -> tuple[str, int]:
    """The bash script for a block, and how many preamble lines precede the block's first."""
    preamble = [
        "set -Eeuo pipefail",
        "export SYSTEMD_PAGER= PAGER=cat SYSTEMD_COLORS=0 LC_ALL=C.UTF-8",
        'cd "${HOME:-/root}"',
        "trap 'echo \"@@runbook-failed $LINENO $? $BASH_COMMAND\" >&2' ERR",
    ]
    if api_key_file:
        preamble.insert(2, f"FALCON_API_KEY=$(cat {shlex.quote(api_key_file)}); export FALCON_API_KEY")
    return "\n".join([*preamble, substitute("\n".join(block.lines))]) + "\n", len(preamble)


def run_block(host: Host, block: Block, api_key_file: str, verbose: bool = False) -> tuple[bool, str]:
    """Run one `sh` block; (passed, detail)."""
    script, offset = block_script(block, api_key_file)
    started = time.monotonic()
    done = host.run(script)
    took = time.monotonic() - started
    if verbose:
        print("\n".join(f"    | {line}" for line in (done.stdout + FAIL_MARK.sub("", done.stderr)).splitlines()))
    if done.returncode == 0:
        return True, f"{took:.1f} s"
    mark = FAIL_MARK.search(done.stderr)
    stderr = FAIL_MARK.sub("", done.stderr).strip()
    if done.returncode == 124:
        detail = f"timed out after {host.timeout:.0f} s"
    elif mark:
        # The doc's own line, not bash's $BASH_COMMAND (in a pipeline, only its last part).
        index = int(mark[1]) - offset - 1
        text = block.lines[index].strip() if 0 <= index < len(block.lines) else mark[3]
        detail = f"line {block.line + index} exited {mark[2]}: {text}"
    else:
        detail = f"exit {done.returncode}"
    tail = "\n".join(f"        {line}" for line in (stderr or done.stdout.strip()).splitlines()[-6:])
    return False, detail + ("\n" + tail if tail else "")


def drill_exists(drill: str) -> bool:
    """A fault script scripts/faults/NAME.sh, or a function NAME() in scripts/e2e_checks.sh."""
    if (REPO_DIR / "scripts" / "faults" / f"{drill}.sh").is_file():
        return True
    checks = REPO_DIR / "scripts" / "e2e_checks.sh"
    return (
        checks.is_file()
        and re.search(rf"^{re.escape(drill)}\(\)", checks.read_text(encoding="utf-8"), re.M) is not None
    )


def check_destructive(blocks: list[Block], out: list[str]) -> int:
    """List each destructive block with its drill; count those with none (or a missing one)."""
    uncovered = 0
    for block in blocks:
        if block.kind != "destructive":
            continue
        first = commands(block)[0][1] if commands(block) else ""
        if first in WITHOUT_DRILL:
            out.append(f"NODRL {block.where:<34} destructive  {first}\n        no drill: {WITHOUT_DRILL[first]}")
            continue
        drills = DESTRUCTIVE_DRILLS.get(first, "")
        missing = [d for d in drills.split() if not drill_exists(d)]
        if not drills or missing:
            uncovered += 1
            why = "no drill listed in DESTRUCTIVE_DRILLS" if not drills else f"no such drill: {' '.join(missing)}"
            out.append(f"FAIL  {block.where:<34} destructive  {first}\n        {why}")
        else:
            out.append(f"DRILL {block.where:<34} destructive  {first}\n        covered by: {drills}")
    return uncovered


def run_promql(host: Host, expressions: list[tuple[str, str]], prometheus: str) -> list[tuple[str, str, bool, str]]:
    """Each expression through `promtool query instant` on the host, in one script."""
    lines = ["set -u"]
    for index, (_, expr) in enumerate(expressions):
        lines.append(
            f"if out=$(promtool query instant {shlex.quote(prometheus)} {shlex.quote(expr)} 2>&1); "
            f"then echo '@@promql {index} ok'; "
            f"else echo \"@@promql {index} failed: $(echo \"$out\" | tail -n 2 | tr '\\n' ' ')\"; fi"
        )
    done = host.run("\n".join(lines) + "\n")
    verdicts = dict(re.findall(r"^@@promql (\d+) (.*)$", done.stdout, re.M))
    results = []
    for index, (where, expr) in enumerate(expressions):
        verdict = verdicts.get(str(index), f"not run ({done.stderr.strip()[-200:]})")
        results.append((where, expr, verdict == "ok", verdict))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "docs", nargs="*", type=Path, help="Markdown files (default: the runbook and the deployment guide)"
    )
    parser.add_argument("--ssh", default="", help="ssh command reaching root on the host (default: run here)")
    parser.add_argument(
        "--api-key-file", default="", help="file ON THE HOST holding an API key, exported as FALCON_API_KEY"
    )
    parser.add_argument("--timeout", type=float, default=60, help="seconds per block (default 60)")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL on the host")
    parser.add_argument("--no-promql", action="store_true", help="skip the PromQL expressions")
    parser.add_argument("--list", action="store_true", help="list the blocks and drills; run nothing")
    parser.add_argument("--verbose", action="store_true", help="print what each block printed")
    args = parser.parse_args(argv)

    docs = args.docs or DOCS
    blocks: list[Block] = []
    expressions: list[tuple[str, str]] = []
    for path in docs:
        text = path.read_text(encoding="utf-8")
        name = str(path.resolve().relative_to(REPO_DIR)) if path.resolve().is_relative_to(REPO_DIR) else str(path)
        blocks += parse_blocks(text, name)
        expressions += promql_expressions(text, name)

    out: list[str] = []
    failed = check_destructive(blocks, out)
    for block in blocks:
        if block.kind == "controller":
            out.append(f"SKIP  {block.where:<34} controller   {commands(block)[0][1] if commands(block) else ''}")
    host = Host(args.ssh, args.timeout)
    runnable = [block for block in blocks if block.kind == "sh"]
    passed = 0
    for block in runnable:
        first = commands(block)[0][1] if commands(block) else ""
        if args.list:
            out.append(f"RUN   {block.where:<34} sh           {first}")
            continue
        ok, detail = run_block(host, block, args.api_key_file, args.verbose)
        passed += ok
        print(f"{'PASS' if ok else 'FAIL'}  {block.where:<34} sh           {first}  ({detail})", flush=True)
    promql_failed = 0
    if not args.no_promql:
        if args.list:
            out += [f"QUERY {where:<34} promql       {expr}" for where, expr in expressions]
        else:
            for where, expr, ok, verdict in run_promql(host, expressions, args.prometheus):
                promql_failed += not ok
                out.append(
                    f"{'PASS' if ok else 'FAIL'}  {where:<34} promql       {expr}" + ("" if ok else f"  ({verdict})")
                )
    failed += (len(runnable) - passed if not args.list else 0) + promql_failed
    print("\n".join(out))
    destructive = sum(block.kind == "destructive" for block in blocks)
    print(
        f"VERDICT: {'FAIL' if failed else 'PASS'}: {len(runnable)} sh blocks"
        + ("" if args.list else f" ({len(runnable) - passed} failed)")
        + f", {len(expressions) if not args.no_promql else 0} PromQL expressions"
        + ("" if args.list or args.no_promql else f" ({promql_failed} failed)")
        + f", {destructive} destructive blocks (drills listed), {failed} problem(s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
