"""The supply chain: hash-pinned locks in sync with their inputs, and pip refusing a wrong hash.

Finding 12 of the security review: every requirements file a host installs from is
hash-locked (`make lock` writes the *.lock files from the *.txt pins), `make venv`
installs with --require-hashes, and the production host installs only the controller's
wheels (--no-index --only-binary :all: --require-hashes) and has no compiler.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES = REPO_ROOT / "ansible" / "roles"
# lock -> the pinned inputs it is compiled from (scripts/lock_requirements.sh).
LOCKS = {
    "requirements.lock": ["requirements.txt"],
    "requirements-dev.lock": ["requirements.txt", "requirements-dev.txt"],
    "requirements-nodeps.lock": ["requirements-nodeps.txt"],
    "requirements-build.lock": ["requirements-build.txt"],
    "requirements-load.lock": ["requirements-load.txt"],
    "requirements-plots.lock": ["requirements-plots.txt"],
    "requirements-profile.lock": ["requirements-profile.txt"],
    "requirements-peers.lock": ["requirements-peers.txt"],
}
# Installed with --no-deps: the lock must hold exactly what the input names.
NO_DEPS_LOCKS = {"requirements-nodeps.lock", "requirements-load.lock", "requirements-profile.lock"}
SHA256 = re.compile(r"--hash=sha256:([0-9a-f]{64})")
COMPILER_PACKAGES = {"build-essential", "gcc", "g++", "cpp", "clang", "python3-dev", "python3.11-dev"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def input_pins(path: Path) -> dict[str, str]:
    """Name -> version of a *.txt input; fails on a line that is not an exact pin."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[A-Za-z0-9,._-]+\])?==([^\s;]+)", line)
        assert match, f"{path.name}:{number}: {raw!r} is not an exact pin (name==version)"
        pins[canonical(match[1])] = match[3]
    return pins


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Name -> (version, sha256 hashes) of a pip-compile lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    # An entry: "name==version \" then "    --hash=sha256:..." lines; "    # via" annotations.
    text = re.sub(r"\\\n", " ", path.read_text())
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)\s", line + " ")
        assert match, f"{path.name}:{number}: {line[:80]!r} is not a pinned entry"
        entries[canonical(match[1])] = (match[2], SHA256.findall(line))
    return entries


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_holds_every_input_pin_with_a_sha256(lock: str) -> None:
    entries = lock_entries(REPO_ROOT / lock)
    pins: dict[str, str] = {}
    for name in LOCKS[lock]:
        pins |= input_pins(REPO_ROOT / name)
    for name, version in pins.items():
        assert name in entries, f"{lock} lacks {name}=={version}: run `make lock`"
        assert entries[name][0] == version, (
            f"{lock} pins {name}=={entries[name][0]}, {' + '.join(LOCKS[lock])} says {version}: run `make lock`"
        )
    unhashed = [name for name, (_version, hashes) in entries.items() if not hashes]
    assert not unhashed, f"{lock}: entries without a sha256: {unhashed}"
    if lock in NO_DEPS_LOCKS:
        extra = sorted(set(entries) - set(pins))
        assert not extra, f"{lock} is installed with --no-deps but holds packages its input does not name: {extra}"


def test_the_dev_lock_installs_the_runtime_lock_unchanged() -> None:
    runtime = lock_entries(REPO_ROOT / "requirements.lock")
    dev = lock_entries(REPO_ROOT / "requirements-dev.lock")
    differ = sorted(name for name in runtime if dev.get(name, (None,))[0] != runtime[name][0])
    assert not differ, f"requirements-dev.lock and requirements.lock disagree on {differ}: run `make lock`"


def _wheel(directory: Path, name: str, version: str) -> Path:
    """Write a minimal pure-Python wheel, enough for pip to install."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": b"ANSWER = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _pip_install(tmp_path: Path, requirement: str, *args: str) -> subprocess.CompletedProcess[str]:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(requirement + "\n")
    # No index, no configured find-links or mirrors: only the wheel under test.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(tmp_path / "wheels"),
         "--only-binary", ":all:", "--target", str(tmp_path / "target"), "-r", str(requirements), *args],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def test_pip_installs_a_wheel_whose_hash_is_locked_and_refuses_any_other(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    wheel = _wheel(tmp_path / "wheels", "lockprobe", "1.0")
    good = hashlib.sha256(wheel.read_bytes()).hexdigest()

    installed = _pip_install(tmp_path, f"lockprobe==1.0 --hash=sha256:{good}", "--require-hashes")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (tmp_path / "target" / "lockprobe.py").exists(), "pip said it installed the wheel but did not"

    # A substituted file: the same name and version, other bytes.
    refused = _pip_install(tmp_path, f"lockprobe==1.0 --hash=sha256:{'0' * 64}", "--require-hashes")
    assert refused.returncode != 0, "pip installed a wheel whose sha256 is not the locked one"
    assert "DO NOT MATCH THE HASHES" in refused.stderr, refused.stderr

    unhashed = _pip_install(tmp_path, "lockprobe==1.0", "--require-hashes")
    assert unhashed.returncode != 0, "pip --require-hashes installed a requirement with no hash"


def _recipe(target: str) -> list[str]:
    """The recipe lines of a Makefile target (the line that starts with `target:`)."""
    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    while lines[start].endswith("\\"):
        start += 1
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_venv_installs_every_package_by_hash() -> None:
    installs = [line for line in _recipe("$(STAMP)") if re.search(r"\bpip\b.* install\b|\$\(PIP\) install", line)]
    assert installs, "no pip install in the .venv recipe"
    for line in installs:
        if line.endswith("-e ."):  # this checkout itself, built from the working tree
            assert "--no-deps" in line and "--no-build-isolation" in line, line
        else:
            assert "--require-hashes" in line and ".lock" in line, f"installs without the locks' hashes: {line}"


def _tasks(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text()) or []


def test_the_host_installs_only_the_controllers_wheels_by_hash() -> None:
    role_vars = yaml.safe_load((ROLES / "falcon_svc" / "vars" / "main.yml").read_text())
    pip_args = role_vars["_falcon_svc_wheelhouse_pip_args"].split()
    for needed in ("--no-index", "--require-hashes", "--only-binary"):
        assert needed in pip_args, f"the host's pip arguments lack {needed}: {pip_args}"
    tasks = _tasks(ROLES / "falcon_svc" / "tasks" / "install.yml")
    pip_tasks = [task for task in tasks if "ansible.builtin.pip" in task]
    assert pip_tasks, "install.yml has no ansible.builtin.pip task"
    for task in pip_tasks:
        assert "_falcon_svc_wheelhouse_pip_args" in task["ansible.builtin.pip"]["extra_args"], task["name"]
        assert task["ansible.builtin.pip"]["requirements"].startswith("{{ _falcon_svc_host_wheelhouse }}/"), task
    for task in tasks:
        command = str(task.get("ansible.builtin.command", {}).get("cmd", ""))
        if "pip install" in command:
            assert "--no-index" in command and "--only-binary :all:" in command, f"{task['name']}: {command}"
        assert "meinheld/install.sh" not in command, f"{task['name']} builds meinheld on the host"


def test_no_role_installs_a_compiler_on_the_host() -> None:
    found = []
    for path in sorted(ROLES.glob("*/*/*.yml")):
        for name in re.findall(r"^\s*-\s*([a-z0-9.+-]+)\s*$", path.read_text(), re.MULTILINE):
            if name in COMPILER_PACKAGES:
                found.append(f"{path.relative_to(REPO_ROOT)}: {name}")
    assert not found, f"a role installs a compiler or Python headers on the host: {found}"


# A stand-in for pip-audit: each FAKE_AUDIT_MODE ends the way pip-audit 2.x does (the last
# lines of its real tracebacks and usage errors, taken from runs without network or with a
# bad argument), so scripts/audit.sh is judged on what it will really read.
FAKE_PIP_AUDIT = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_AUDIT_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
mode = os.environ["FAKE_AUDIT_MODE"]
TRACEBACK = "Traceback (most recent call last):\\n  File \\"pip_audit/_cli.py\\", line 554, in audit\\n"
ENDINGS = {{
    "offline": "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='pypi.org', port=443): "
               "Max retries exceeded with url: /pypi/falcon/4.4.0/json (Caused by NameResolutionError)",
    "proxy-down": "requests.exceptions.ProxyError: HTTPSConnectionPool(host='pypi.org', port=443): "
                  "Max retries exceeded (Caused by ProxyError('Unable to connect to proxy'))",
    "feed-timeout": "pip_audit._service.interface.ConnectionError: Could not connect to PyPI's vulnerability feed",
    "server-error": "requests.exceptions.HTTPError: 503 Server Error: Service Unavailable for url: "
                    "https://pypi.org/pypi/falcon/4.4.0/json\\n\\nThe above exception was the direct cause "
                    "of the following exception:\\n\\n" + TRACEBACK + "pip_audit._service.interface.ServiceError",
    "forbidden": "requests.exceptions.HTTPError: 403 Client Error: Forbidden for url: "
                 "https://pypi.org/pypi/falcon/4.4.0/json\\n\\nThe above exception was the direct cause "
                 "of the following exception:\\n\\n" + TRACEBACK + "pip_audit._service.interface.ServiceError",
    "crash": "KeyError: 'vulnerabilities'",
}}
if mode == "usage":
    sys.stderr.write("usage: pip-audit [-h] [-V] ...\\npip-audit: error: unrecognized arguments: --bogus\\n")
    sys.exit(2)
if mode == "bad-lock":
    sys.stderr.write("ERROR:pip_audit._cli:requirement file x.lock contains invalid specifier at line 1\\n"
                     "    x===\\n     ^\\n")
    sys.exit(1)
if mode in ENDINGS:
    sys.stderr.write(TRACEBACK + ENDINGS[mode] + "\\n")
    sys.exit(1)
deps = [{{"name": "falcon", "version": "4.4.0", "vulns": []}}]
if mode == "vulnerable":
    deps[0]["vulns"] = [{{"id": "PYSEC-0000-1", "fix_versions": ["4.4.1"]}}]
with open(args[args.index("--output") + 1], "w") as report:
    json.dump({{"dependencies": deps}}, report)
sys.exit(1 if mode == "vulnerable" else 0)
"""


def _run_audit(tmp_path: Path, mode: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run scripts/audit.sh with the stand-in pip-audit in ``mode``; return the result and its calls."""
    fake = tmp_path / "pip-audit"
    fake.write_text(FAKE_PIP_AUDIT.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "audit.sh"), *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PIP_AUDIT": str(fake), "PYTHON": sys.executable,
             "FAKE_AUDIT_LOG": str(log), "FAKE_AUDIT_MODE": mode},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return result, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize(
    ("mode", "exit_code", "said"),
    [
        ("clean", 0, "no known vulnerability"),
        ("vulnerable", 1, "VULNERABLE: requirements.lock: falcon 4.4.0: PYSEC-0000-1"),
        # The database cannot be reached: warn, and let an offline build test.
        ("offline", 0, "WARNING: requirements.lock: not audited, pip-audit could not reach its database"),
        ("proxy-down", 0, "could not reach its database: requests.exceptions.ProxyError"),
        ("feed-timeout", 0, "could not reach its database: pip_audit._service.interface.ConnectionError"),
        ("server-error", 0, "could not reach its database: pip_audit._service.interface.ServiceError"),
        # Anything else is a broken audit, and must not pass `make test`.
        ("forbidden", 1, "FAILED: requirements.lock: pip-audit exited 1 without a report"),
        ("crash", 1, "FAILED: requirements.lock: pip-audit exited 1 without a report: KeyError"),
        ("usage", 1, "FAILED: requirements.lock: pip-audit exited 2 without a report: pip-audit: error"),
        ("bad-lock", 1, "without a report: ERROR:pip_audit._cli:requirement file x.lock contains invalid"),
    ],
)
def test_audit_checks_the_locks_by_hash_and_skips_only_an_unreachable_database(
    tmp_path: Path, mode: str, exit_code: int, said: str
) -> None:
    """scripts/audit.sh judges pip-audit's report and errors; pip-audit itself is a stand-in (no network)."""
    result, calls = _run_audit(tmp_path, mode)
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert said in result.stdout, result.stdout
    audited = [Path(call[call.index("--requirement") + 1]).name for call in calls]
    assert audited == ["requirements.lock", "requirements-nodeps.lock", "requirements-build.lock", "meinheld-sdist.txt"]
    assert all("--require-hashes" in call and "--disable-pip" in call for call in calls), calls


def test_audit_fails_when_the_real_pip_audit_rejects_its_arguments(tmp_path: Path) -> None:
    """The real pip-audit (no network needed: it fails parsing its arguments) with a bogus flag fails the audit."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("falcon==4.0.2 --hash=sha256:" + "0" * 64 + "\n")
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "audit.sh"), "--no-such-flag"],
        cwd=REPO_ROOT,
        env={**os.environ, "PIP_AUDIT": str(REPO_ROOT / ".venv" / "bin" / "pip-audit"),
             "PYTHON": sys.executable, "AUDIT_REQUIREMENTS": str(requirements)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unrecognized arguments: --no-such-flag" in result.stdout, result.stdout
