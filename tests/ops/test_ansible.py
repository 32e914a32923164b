"""Check the Ansible roles in ansible/: layout, meta, argument specs, syntax and lint,
the env file the falcon_svc role writes against the service's settings, and how the role
judges training.

The tools live in their own venv (`make deploy-tools` builds .venv-deploy from
requirements-deploy.txt; ANSIBLE_BIN_DIR points elsewhere). Missing tools make these
tests fail, not skip: CI must check the deployment code.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tools import require_tool

from falcon_svc.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO_ROOT / "ansible"
ROLES = sorted(p for p in (ANSIBLE_DIR / "roles").iterdir() if p.is_dir())
TEMPLATES = sorted((ANSIBLE_DIR / "roles").glob("*/templates/**/*.j2"))
# A relative ANSIBLE_BIN_DIR is taken from the repo root (the tools run in ansible/).
BIN_DIR = REPO_ROOT / os.environ.get("ANSIBLE_BIN_DIR", ".venv-deploy/bin")
SITE_ROLES = [
    "common",
    "firewall",
    "redis",
    "postgresql",
    "falcon_svc",
    "nginx",
    "node_exporter",
    "exporters",
    "prometheus",
    "grafana",
]


def _tool(name: str) -> str:
    path = BIN_DIR / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found: run `make deploy-tools` (or set ANSIBLE_BIN_DIR)")
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "PATH": f"{BIN_DIR}:{os.environ['PATH']}"}
    return subprocess.run(args, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_site_runs_every_role_in_order() -> None:
    """Every role once, in the order of one host's install (the plays run one after another)."""
    site = yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())
    assert [r["role"] for play in site for r in play.get("roles", [])] == SITE_ROLES
    assert sorted(SITE_ROLES) == [r.name for r in ROLES]


def test_site_plays_target_their_group_and_standalone_hosts() -> None:
    """Each role's play runs on its inventory group, and on hosts in none (the [falcon]-only inventories)."""
    plays = {
        tuple(r["role"] for r in play.get("roles", [])): set(play["hosts"].split(":"))
        for play in yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())
    }
    every = {"falcon_standalone", "falcon_lb", "falcon_app", "falcon_data", "falcon_monitoring"}
    assert plays[("redis", "postgresql")] == {"falcon_standalone", "falcon_data"}
    assert plays[("falcon_svc",)] == {"falcon_standalone", "falcon_app"}
    assert plays[("nginx",)] == {"falcon_standalone", "falcon_lb"}
    assert plays[("prometheus", "grafana")] == {"falcon_standalone", "falcon_monitoring"}
    assert plays[("common", "firewall")] == every
    assert plays[("node_exporter", "exporters")] == every


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_layout_and_argument_specs(role: Path) -> None:
    for required in ("defaults/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
        assert (role / required).is_file(), f"{role.name}: {required} missing"
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) <= set(options), f"{role.name}: undocumented {sorted(set(defaults) - set(options))}"
    for name, option in options.items():
        assert name.startswith(f"{role.name}_"), f"{role.name}: {name} lacks the role prefix"
        assert option.get("description"), f"{role.name}: {name} has no description"
    tasks = (role / "tasks/main.yml").read_text()
    assert "preflight.yml" in tasks.split("install.yml")[0], f"{role.name}: preflight must come first"


PLATFORMS = [{"name": "Debian", "versions": ["bookworm"]}, {"name": "Ubuntu", "versions": ["jammy", "noble"]}]


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_meta_states_platforms_and_no_dependencies(role: Path) -> None:
    meta = yaml.safe_load((role / "meta/main.yml").read_text())
    info = meta["galaxy_info"]
    assert meta["dependencies"] == [], f"{role.name}: site.yml orders the roles; meta must not pull others in"
    assert info["author"] and info["license"] == "MIT", f"{role.name}: author and license MIT"
    assert info["platforms"] == PLATFORMS, f"{role.name}: platforms are Debian bookworm, Ubuntu jammy and noble"
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())
    assert info["description"] == specs["argument_specs"]["main"]["short_description"], (
        f"{role.name}: descriptions differ"
    )
    pinned = re.search(r"^ansible-core==(\d+\.\d+)", (REPO_ROOT / "requirements-deploy.txt").read_text(), re.MULTILINE)
    assert pinned and info["min_ansible_version"] == pinned[1], f"{role.name}: the minimum is the ansible-core CI tests"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(ANSIBLE_DIR / "roles")))
def test_template_starts_with_ansible_managed(template: Path) -> None:
    assert template.read_text().startswith("{{ ansible_managed | comment }}\n")


@pytest.mark.parametrize("playbook", ["site.yml", "deploy-model.yml", "deploy.yml"])
def test_syntax_check(playbook: str) -> None:
    result = _run(_tool("ansible-playbook"), "--syntax-check", "-i", "inventory.example.ini", playbook)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_ansible_lint_production_profile() -> None:
    result = _run(_tool("ansible-lint"), "--offline", "--profile", "production", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_env_file_leaves_the_port_to_the_unit():
    """EnvironmentFile= overrides Environment=, so the file must not carry BIND or INSTANCE_NAME."""
    template = (ANSIBLE_DIR / "roles" / "falcon_svc" / "templates" / "falcon-svc.env.j2").read_text()
    for key in ("BIND", "INSTANCE_NAME"):
        assert not re.search(rf"^{key}=", template, re.MULTILINE), f"{key}= in the env file would override the unit's"


# --- The env file the falcon_svc role writes, and the settings the service reads ---------

FALCON_ROLE = ANSIBLE_DIR / "roles" / "falcon_svc"
ENV_TEMPLATE = FALCON_ROLE / "templates" / "falcon-svc.env.j2"
SETTING_KEYS = {field.name.upper() for field in dataclasses.fields(Settings)}
# The unit sets these from its instance name (test_env_file_leaves_the_port_to_the_unit).
UNIT_KEYS = {"BIND", "INSTANCE_NAME"}
# Secrets that pass the role's preflight (16+ URL-safe characters).
TEST_SECRETS = {
    "falcon_svc_redis_password": "redis-secret-0123456789",
    "falcon_svc_db_owner_password": "owner-secret-0123456789",
    "falcon_svc_db_writer_password": "writer-secret-0123456789",
}


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _yaml_list(path: Path) -> list[dict[str, Any]]:
    """A task file: a list of tasks."""
    return yaml.safe_load(path.read_text()) or []


def _template_keys() -> set[str]:
    """Keys the env template writes itself, from this role's variables (MODEL_DIR, the URLs...)."""
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_TEMPLATE.read_text(), re.MULTILINE))


def _env_spec(name: str) -> dict[str, Any]:
    return _yaml(FALCON_ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"][name]


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them; a key written twice is an error."""
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"{path.name} writes a key twice: {sorted(keys)}"
    return dict(pairs)


def _play(
    tmp_path: Path, tasks: list[dict[str, Any]], hosts: dict[str, dict[str, Any]], *args: str, role: Path = FALCON_ROLE
) -> str:
    """Run ``tasks`` on local hosts that have the role's defaults and vars plus their own.

    The role's variables go in as group vars, so each host's own vars win over them;
    ``args`` go to ansible-playbook (``--diff``). Returns the output, which ends with the play recap.
    """
    group_vars = {**_yaml(role / "defaults" / "main.yml")}
    if (role / "vars" / "main.yml").is_file():
        group_vars |= _yaml(role / "vars" / "main.yml")
    group_vars |= {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts, "vars": group_vars}}))
    play = {"name": f"Probe the {role.name} role", "hosts": "all", "gather_facts": False, "tasks": tasks}
    play["handlers"] = [{"name": "Restart falcon workers", "ansible.builtin.debug": {"msg": "handler ran"}}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    result = _run(_tool("ansible-playbook"), *args, "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"))
    assert "PLAY RECAP" in result.stdout, result.stdout + result.stderr
    return result.stdout


def _recap(output: str) -> dict[str, dict[str, int]]:
    """Per host: ok, changed, failed... counts from the play recap."""
    recap = output.rsplit("PLAY RECAP", maxsplit=1)[-1]
    return {
        host: {name: int(count) for name, count in re.findall(r"(\w+)=(\d+)", counts)}
        for host, counts in re.findall(r"^(\S+)\s+:\s+(.*)$", recap, re.MULTILINE)
    }


def test_env_file_carries_only_settings_and_the_role_rejects_a_mistyped_override(tmp_path: Path) -> None:
    """Render falcon-svc.env as the role does: every key is a setting the service parses.

    A key the service does not know would be ignored by it without a word; a mistyped
    operator override must fail the run (the role's argument spec) instead.
    """
    hosts = {
        "role_defaults": {**TEST_SECRETS},
        "overridden": {**TEST_SECRETS, "falcon_svc_env_overrides": {"WORKERS": 4, "ALLOW_DUMMY_MODEL": True}},
        "mistyped": {**TEST_SECRETS, "falcon_svc_env_overrides": {"WORKRES": 4}},
    }
    options = {name: _env_spec(name) for name in ("falcon_svc_env", "falcon_svc_env_overrides")}
    tasks = [
        {
            "name": "Check the settings against the role's argument spec",
            "ansible.builtin.validate_argument_spec": {
                "argument_spec": options,
                "provided_arguments": {name: f"{{{{ {name} }}}}" for name in options},
            },
        },
        {
            "name": "Write the env file as the role does",
            "ansible.builtin.template": {
                "src": str(ENV_TEMPLATE),
                "dest": f"{tmp_path}/{{{{ inventory_hostname }}}}.env",
                "mode": "0600",
            },
        },
    ]
    output = _play(tmp_path, tasks, hosts)
    recap = _recap(output)
    assert recap["role_defaults"]["failed"] == 0 and recap["overridden"]["failed"] == 0, output
    assert recap["mistyped"]["failed"] == 1 and "falcon_svc_env_overrides.WORKRES" in output, output
    assert not (tmp_path / "mistyped.env").exists(), "a mistyped override still wrote the env file"

    for host in ("role_defaults", "overridden"):
        written = _read_env_file(tmp_path / f"{host}.env")
        unknown = sorted(set(written) - SETTING_KEYS)
        assert not unknown, f"{host}.env writes keys that are no setting (the service ignores them): {unknown}"
        assert not set(written) & UNIT_KEYS, f"{host}.env overrides the unit's {sorted(set(written) & UNIT_KEYS)}"
        settings = Settings.from_env(written)  # every value parses, as a worker would read it
        assert str(settings.model_dir) == _yaml(FALCON_ROLE / "defaults" / "main.yml")["falcon_svc_model_dir"]
    overridden = Settings.from_env(_read_env_file(tmp_path / "overridden.env"))
    assert overridden.workers == 4 and overridden.allow_dummy_model is True, "the overrides were not written"
    assert Settings.from_env(_read_env_file(tmp_path / "role_defaults.env")).allow_dummy_model is False


def test_role_env_passes_only_what_differs_from_the_code() -> None:
    """The code is the one home of a default: the role restates none (see defaults/main.yml)."""
    role_env = _yaml(FALCON_ROLE / "defaults" / "main.yml")["falcon_svc_env"]
    defaults = Settings()
    assert role_env, "falcon_svc_env is empty: drop this test's premise or the variable"
    for key, value in role_env.items():
        assert key in SETTING_KEYS, f"falcon_svc_env: {key} is no setting of falcon_svc/settings.py"
        name = key.lower()
        assert getattr(Settings.from_env({key: str(value)}), name) != getattr(defaults, name), (
            f"falcon_svc_env restates the code's default {key}={value}: remove it from defaults/main.yml"
        )


def test_argument_spec_lists_exactly_the_settings_the_operator_may_set() -> None:
    """Every setting but the unit's and the template's own: no more (typos pass), no fewer (real ones fail)."""
    settable = SETTING_KEYS - UNIT_KEYS - _template_keys()
    assert _template_keys() <= SETTING_KEYS, f"the env template writes no-settings {_template_keys() - SETTING_KEYS}"
    for name in ("falcon_svc_env", "falcon_svc_env_overrides"):
        spec = _env_spec(name)
        assert set(spec["options"]) == settable, (
            f"{name} options vs settings: extra {sorted(set(spec['options']) - settable)}, "
            f"missing {sorted(settable - set(spec['options']))}"
        )


# (exit code of `falcon-svc train --detailed-exit-code`, operator overrides) -> (changed, failed)
TRAINING_OUTCOMES = {
    "valid_model_kept": (0, {}, False, False),
    "model_trained": (3, {}, True, False),
    "kept_model_signed": (5, {}, True, False),
    "dummy_refused": (4, {}, False, True),
    "dummy_allowed": (4, {"ALLOW_DUMMY_MODEL": "yes"}, True, False),
    "training_failed": (1, {}, False, True),
    "cli_without_the_option": (2, {}, False, True),
}


def test_model_task_judges_training_by_exit_code(tmp_path: Path) -> None:
    """tasks/model.yml reports changed only when a model was written, and fails on a refused dummy.

    The training command is a stand-in that exits with each code the real one has; what
    it prints must not matter, so it prints what used to be matched ("written to", DUMMY).
    """
    hosts = {}
    for host, (code, overrides, _, _) in TRAINING_OUTCOMES.items():
        stub = tmp_path / host / "falcon-svc"
        stub.parent.mkdir()
        stub.write_text(f'#!/bin/sh\necho "$@" > "$0.args"\necho "written to"\necho DUMMY >&2\nexit {code}\n')
        stub.chmod(0o755)
        hosts[host] = {
            "_falcon_svc_bin": str(stub),
            "falcon_svc_env_overrides": overrides,
            "falcon_svc_state_dir": str(tmp_path),
            "falcon_svc_model_dir": "/srv/model",
            "_falcon_svc_model_signing_key": "/srv/keys/model-signing.key",
            "ansible_become": False,
        }
    tasks = [
        {"name": "Run the role's model tasks", "ansible.builtin.import_tasks": str(FALCON_ROLE / "tasks/model.yml")}
    ]
    recap = _recap(output := _play(tmp_path, tasks, hosts))
    for host, (code, _, changed, failed) in TRAINING_OUTCOMES.items():
        assert (tmp_path / host / "falcon-svc.args").read_text().split() == [
            "train",
            "--detailed-exit-code",
            "--atomic",
            "--signing-key",
            "/srv/keys/model-signing.key",
            "--output-dir",
            "/srv/model",
        ]
        assert (bool(recap[host]["changed"]), bool(recap[host]["failed"])) == (changed, failed), (
            f"exit {code} ({host}): expected changed={changed} failed={failed}\n{output}"
        )


# --- Secrets: never in an environment or on a command line, never printed ------------

# A variable is a secret when its name says so. The words, and why each is one:
#   password, passwd, requirepass  passwords (requirepass is Redis's word for its own);
#   secret, token                  credentials by their other common names;
#   routing_key, api_key, private_key
#                                  keys that are credentials (PagerDuty's routing key). A bare
#                                  "key" is not: item.key, grafana_apt_key_url, dict keys;
#   pagerduty                      PagerDuty settings carry its key;
#   smtp_auth                      Alertmanager's SMTP credentials (smtp_auth_password, _secret);
#   dsn                            a connection string may carry a password (DATA_SOURCE_NAME).
# A variable whose value refers to a secret is one too (_falcon_svc_database_url holds the
# writer's password), and so is an attribute with such a name (item.password).
SECRET_NAME = re.compile(
    r"password|passwd|requirepass|secret|token|routing_key|api_key|private_key|pagerduty|smtp_auth|dsn",
    re.IGNORECASE,
)
_JINJA = re.compile(r"{{.*?}}|{%.*?%}", re.DOTALL)
_STRING_LITERAL = re.compile(r"'[^']*'|\"[^\"]*\"")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Task keys whose strings are Jinja expressions without braces.
_BARE_EXPRESSION_KEYS = {"when", "changed_when", "failed_when", "until", "that"}
# Modules whose arguments become the remote command line (visible in ps and sudo's log).
_COMMAND_MODULES = {f"{prefix}{name}" for prefix in ("", "ansible.builtin.") for name in ("command", "shell", "raw")}
_TEMPLATE_MODULES = {"template", "ansible.builtin.template"}
_BLOCK_KEYS = ("block", "rescue", "always")


def _names_in(value: Any, bare: bool = False) -> set[str]:
    """Names a task value refers to: identifiers inside Jinja, outside string literals."""
    if isinstance(value, str):
        chunks = [value] if bare else _JINJA.findall(value)
        return {name for chunk in chunks for name in _IDENTIFIER.findall(_STRING_LITERAL.sub("", chunk))}
    if isinstance(value, dict):
        return set().union(*(_names_in(item, bare or key in _BARE_EXPRESSION_KEYS) for key, item in value.items()))
    if isinstance(value, list):
        return set().union(*(_names_in(item, bare) for item in value))
    return set()


def _secret_variables(ansible_dir: Path) -> set[str]:
    """Every variable defined in group_vars, defaults or vars that is a secret, or refers to one."""
    definitions: dict[str, set[str]] = {}
    sources = [*ansible_dir.glob("group_vars/**/*.yml"), *ansible_dir.glob("roles/*/defaults/*.yml")]
    for path in [*sources, *ansible_dir.glob("roles/*/vars/*.yml")]:
        for name, value in _yaml(path).items():
            definitions.setdefault(name, set()).update(_names_in(value))
    secrets = {name for name in definitions if SECRET_NAME.search(name)}
    while grown := {name for name, refs in definitions.items() if refs & secrets} - secrets:
        secrets |= grown
    return secrets


def _templates_of(task: dict[str, Any], role: Path) -> list[Path]:
    """The template files a template task renders (all of the role's when src is an expression)."""
    module = next((key for key in task if key in _TEMPLATE_MODULES), None)
    if module is None:
        return []
    src = task[module]["src"]
    return sorted((role / "templates").glob("*.j2")) if "{{" in src else [role / "templates" / src]


def _secret_leaks(ansible_dir: Path) -> list[str]:
    """Tasks and handlers that pass a secret in an environment or a command line, or log one."""
    secrets = _secret_variables(ansible_dir)

    def secret(names: set[str]) -> list[str]:
        return sorted(name for name in names if name in secrets or SECRET_NAME.search(name))

    leaks: list[str] = []

    def check(tasks: list[dict[str, Any]], role: Path, where: str, no_log: bool) -> None:
        for task in tasks:
            label = f"{where}: {task.get('name', '(unnamed)')!r}"
            if in_env := secret(_names_in(task.get("environment"))):
                leaks.append(f"{label} puts {in_env} in environment: (use a 0600 file or stdin)")
            for module in _COMMAND_MODULES & set(task):
                args = task[module]
                line = args if isinstance(args, str) else [args.get("cmd"), args.get("argv")]
                if on_line := secret(_names_in(line)):
                    leaks.append(f"{label} puts {on_line} on the command line (use stdin or a 0600 file)")
            logged = no_log or task.get("no_log") is True
            if any(key in task for key in _BLOCK_KEYS):
                for key in _BLOCK_KEYS:
                    check(task.get(key) or [], role, where, logged)
                continue
            names = _names_in(task) | {
                name for path in _templates_of(task, role) for name in _names_in(path.read_text())
            }
            if not logged and (used := secret(names)):
                leaks.append(f"{label} handles {used} without no_log: true (--diff and -v print it)")

    for path in sorted([*ansible_dir.glob("roles/*/tasks/*.yml"), *ansible_dir.glob("roles/*/handlers/*.yml")]):
        role = path.parents[1]
        check(yaml.safe_load(path.read_text()) or [], role, str(path.relative_to(ansible_dir)), False)
    return leaks


def test_no_task_passes_a_secret_in_its_environment_or_command_line_or_logs_it() -> None:
    """ps, /proc and sudo's log show a command's environment and arguments; --diff shows what a task writes."""
    assert {"falcon_svc_db_owner_password", "_falcon_svc_database_url", "exporters_postgres_dsn"} <= (
        _secret_variables(ANSIBLE_DIR)
    ), "the secret variables are not recognised: this check would pass anything"
    leaks = _secret_leaks(ANSIBLE_DIR)
    assert not leaks, "secrets can leak:\n" + "\n".join(leaks)


# (case, task, what the check must say about it). x_url refers to x_password (group_vars).
LEAKY_TASKS = [
    (
        "env",
        {"name": "Migrate", "command": "migrate", "environment": {"URL": "{{ x_url }}"}, "no_log": True},
        "environment",
    ),
    ("argv", {"name": "Log in", "command": {"argv": ["psql", "{{ x_password }}"]}, "no_log": True}, "command line"),
    ("item", {"name": "Write", "ansible.builtin.copy": {"content": "{{ item.password }}", "dest": "/f"}}, "no_log"),
    ("template", {"name": "Render", "ansible.builtin.template": {"src": "x.j2", "dest": "/f"}}, "no_log"),
    ("assert", {"name": "Check", "ansible.builtin.assert": {"that": ["x_token | length > 16"]}}, "no_log"),
    (
        "block",
        {"name": "Outer", "block": [{"name": "Inner", "ansible.builtin.debug": {"msg": "{{ x_url }}"}}]},
        "no_log",
    ),
]
SAFE_TASKS = [
    {"name": "Write", "ansible.builtin.copy": {"content": "{{ x_password }}", "dest": "/f"}, "no_log": True},
    {"name": "Outer", "no_log": True, "block": [{"name": "Inner", "ansible.builtin.debug": {"msg": "{{ x_url }}"}}]},
    {"name": "Migrate", "command": {"cmd": "migrate", "stdin": "{{ x_url }}"}, "no_log": True},
    {"name": "Loop", "ansible.builtin.debug": {"msg": "{{ item.key }} {{ 'password' }}"}, "loop": "{{ x_names }}"},
]


def _fake_ansible_dir(tmp_path: Path, tasks: list[dict[str, Any]]) -> Path:
    role = tmp_path / "roles" / "demo"
    for sub in ("tasks", "templates", "defaults"):
        (role / sub).mkdir(parents=True)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text("x_password: CHANGE-ME\nx_names: [a, b]\n")
    (role / "defaults" / "main.yml").write_text("x_url: 'postgresql://u:{{ x_password }}@h/d'\n")
    (role / "templates" / "x.j2").write_text("URL={{ x_url }}\n")
    (role / "tasks" / "main.yml").write_text(yaml.safe_dump(tasks))
    return tmp_path


@pytest.mark.parametrize(("task", "complaint"), [case[1:] for case in LEAKY_TASKS], ids=[c[0] for c in LEAKY_TASKS])
def test_the_secret_check_catches_each_kind_of_leak(tmp_path: Path, task: dict[str, Any], complaint: str) -> None:
    leaks = _secret_leaks(_fake_ansible_dir(tmp_path, [task]))
    assert len(leaks) == 1 and complaint in leaks[0], f"expected one {complaint!r} leak for {task}, got {leaks}"


def test_the_secret_check_accepts_no_log_stdin_and_names_that_are_not_secrets(tmp_path: Path) -> None:
    assert _secret_leaks(_fake_ansible_dir(tmp_path, SAFE_TASKS)) == []


# --- Alertmanager: no placeholder receivers when alerts notify, mail over TLS only ---------

PROMETHEUS_ROLE = ANSIBLE_DIR / "roles" / "prometheus"
PAGERDUTY_KEY = "R0ut1ngKey0123456789abcdefABCDEF"  # the shape of a real one: 32 letters and digits
REAL_RECEIVERS = {
    "prometheus_alertmanager_pagerduty_routing_key": PAGERDUTY_KEY,
    "prometheus_alertmanager_email_to": "oncall@alerts.falcon-svc.io",
    "prometheus_alertmanager_email_from": "alertmanager@falcon-svc.io",
    "prometheus_alertmanager_smtp_smarthost": "smtp.falcon-svc.io:587",
}
SMTP_PASSWORD = {"prometheus_alertmanager_smtp_auth_password": "smtp-pass-0123456789"}
# host -> (its variables over REAL_RECEIVERS, whether the preflight must refuse it)
RECEIVER_CASES = {
    "real": ({}, False),
    "notify_off_with_the_defaults": (
        {key: "" for key in REAL_RECEIVERS} | {"prometheus_alertmanager_notify": False},
        False,
    ),
    "group_vars_placeholder_key": (
        {"prometheus_alertmanager_pagerduty_routing_key": "CHANGE-ME-use-ansible-vault"},
        True,
    ),
    "repository_placeholder_key": (
        {"prometheus_alertmanager_pagerduty_routing_key": "REPLACE_WITH_PAGERDUTY_EVENTS_V2_ROUTING_KEY"},
        True,
    ),
    "no_key": ({"prometheus_alertmanager_pagerduty_routing_key": ""}, True),
    "repository_placeholder_receiver": ({"prometheus_alertmanager_email_to": "falcon-svc-team@example.com"}, True),
    "repository_placeholder_sender": (
        {"prometheus_alertmanager_email_from": "alertmanager@falcon-svc.example.com"},
        True,
    ),
    "no_receiver": ({"prometheus_alertmanager_email_to": ""}, True),
    "no_relay": ({"prometheus_alertmanager_smtp_smarthost": ""}, True),
    "smtp_login": ({"prometheus_alertmanager_smtp_auth_username": "am", **SMTP_PASSWORD}, False),
    "smtp_user_without_password": ({"prometheus_alertmanager_smtp_auth_username": "am"}, True),
    "smtp_password_without_user": (SMTP_PASSWORD, True),
}


def _prometheus_host(**overrides: Any) -> dict[str, Any]:
    """A local host with the prometheus role's inputs pointing at this checkout."""
    return {
        "prometheus_source_config": str(REPO_ROOT / "prometheus" / "prometheus.yml"),
        "prometheus_source_rules_dir": str(REPO_ROOT / "prometheus" / "rules"),
        "prometheus_alertmanager_source_config": str(REPO_ROOT / "prometheus" / "alertmanager.yml"),
        **REAL_RECEIVERS,
        **overrides,
    }


def test_preflight_refuses_placeholder_receivers_when_alerts_notify(tmp_path: Path) -> None:
    """With prometheus_alertmanager_notify (the default) a deploy whose pages go nowhere fails up front."""
    hosts = {host: _prometheus_host(**overrides) for host, (overrides, _) in RECEIVER_CASES.items()}
    tasks = [
        {
            "name": "Run the role's preflight",
            "ansible.builtin.import_tasks": str(PROMETHEUS_ROLE / "tasks/preflight.yml"),
        }
    ]
    output = _play(tmp_path, tasks, hosts, role=PROMETHEUS_ROLE)
    recap = _recap(output)
    for host, (_, refused) in RECEIVER_CASES.items():
        assert bool(recap[host]["failed"]) == refused, f"{host}: expected refused={refused}\n{output}"
    assert PAGERDUTY_KEY not in output, "the preflight printed the PagerDuty routing key"


def test_alertmanager_config_requires_tls_and_diff_does_not_print_the_secrets(tmp_path: Path) -> None:
    """Render alertmanager.yml with the role's own task, under --diff: the file has the secrets, the output not."""
    (task,) = [
        task
        for task in _yaml_list(PROMETHEUS_ROLE / "tasks" / "configure.yml")
        if task["name"].startswith("Write alertmanager.yml")
    ]
    task.pop("notify")  # no Alertmanager to reload here
    copy = task["ansible.builtin.copy"]
    copy = {key: value for key, value in copy.items() if key not in {"owner", "group"}}
    copy["dest"] = f"{tmp_path}/{{{{ inventory_hostname }}}}.yml"
    copy["validate"] = f"{require_tool('amtool', 'prometheus-alertmanager')} check-config %s"
    task["ansible.builtin.copy"] = copy
    # The login host's source already requires TLS: the role must handle the file either way.
    source = tmp_path / "alertmanager-tls.yml"
    source.write_text((REPO_ROOT / "prometheus" / "alertmanager.yml").read_text().replace("_tls: false", "_tls: true"))
    login = {"prometheus_alertmanager_smtp_auth_username": "am", **SMTP_PASSWORD}
    login["prometheus_alertmanager_source_config"] = str(source)
    hosts = {"no_login": _prometheus_host(), "login": _prometheus_host(**login)}
    output = _play(tmp_path, [task], hosts, "--diff", role=PROMETHEUS_ROLE)
    assert not any(counts["failed"] for counts in _recap(output).values()), output
    for secret in (PAGERDUTY_KEY, SMTP_PASSWORD["prometheus_alertmanager_smtp_auth_password"]):
        assert secret not in output, f"--diff printed a secret ({secret[:4]}...)"
    configs = {host: yaml.safe_load((tmp_path / f"{host}.yml").read_text()) for host in hosts}
    for host, config in configs.items():
        assert config["global"]["smtp_require_tls"] is True, f"{host}: alert mail must not go out in clear text"
        assert config["global"]["smtp_smarthost"] == REAL_RECEIVERS["prometheus_alertmanager_smtp_smarthost"]
        receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
        assert receivers["pager"]["pagerduty_configs"][0]["routing_key"] == PAGERDUTY_KEY
        assert receivers["team-email"]["email_configs"][0]["to"] == REAL_RECEIVERS["prometheus_alertmanager_email_to"]
    assert "smtp_auth_username" not in configs["no_login"]["global"], "no login was configured"
    assert {key: configs["login"]["global"].get(key) for key in ("smtp_auth_username", "smtp_auth_password")} == {
        "smtp_auth_username": "am",
        "smtp_auth_password": SMTP_PASSWORD["prometheus_alertmanager_smtp_auth_password"],
    }


# --- Grafana: apt trusts its key only by the pinned fingerprint ----------------------

GRAFANA_ROLE = ANSIBLE_DIR / "roles" / "grafana"


def _gpg_key(gnupg: Path, name: str, *, subkey: bool = False) -> tuple[str, list[str]]:
    """Make a throw-away key; return it armored and its fingerprints (primary first)."""
    require_tool("gpg-agent", "gpg-agent")  # gpg generates secret keys through the agent
    gpg = [require_tool("gpg", "gpg"), "--homedir", str(gnupg), "--batch", "--passphrase", ""]
    user_id = f"{name} <{name}@example.invalid>"
    subprocess.run([*gpg, "--quick-gen-key", user_id, "ed25519", "sign", "never"], check=True)
    listing = subprocess.run([*gpg, "--with-colons", "--list-keys", name], capture_output=True, text=True, check=True)
    primary = re.findall(r"^fpr:+([0-9A-F]{40}):", listing.stdout, re.MULTILINE)[0]
    if subkey:
        subprocess.run([*gpg, "--quick-add-key", primary, "ed25519", "sign", "never"], check=True)
    listing = subprocess.run([*gpg, "--with-colons", "--list-keys", name], capture_output=True, text=True, check=True)
    armored = subprocess.run([*gpg, "--armor", "--export", primary], capture_output=True, text=True, check=True)
    return armored.stdout, re.findall(r"^fpr:+([0-9A-F]{40}):", listing.stdout, re.MULTILINE)


@pytest.fixture
def gnupg(tmp_path: Path) -> Iterator[Path]:
    """A throw-away GnuPG home; its agent is stopped afterwards (gpg starts one per home)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    yield home
    gpgconf = shutil.which("gpgconf")
    if gpgconf:
        subprocess.run([gpgconf, "--homedir", str(home), "--kill", "gpg-agent"], check=False, capture_output=True)


def test_grafana_apt_key_is_trusted_only_with_the_pinned_fingerprint(tmp_path: Path, gnupg: Path) -> None:
    """The role's key tasks install a key file only when its one primary key is the pinned one.

    Refused: another key; the pinned key with a second one beside it; a key that carries the
    pinned fingerprint only as a subkey (anyone can bind a public key as their own subkey).
    """
    grafana, (grafana_fpr, _) = _gpg_key(gnupg, "grafana", subkey=True)  # its fpr lines: primary, subkey
    other, (other_fpr,) = _gpg_key(gnupg, "other")
    wrapper, (_, wrapped_fpr) = _gpg_key(gnupg, "wrapper", subkey=True)
    cases = {  # host: (key file served, pinned fingerprint, trusted)
        "pinned": (grafana, grafana_fpr, True),
        "pinned_spaced_lowercase": (grafana, " ".join([grafana_fpr[:20], grafana_fpr[20:]]).lower(), True),
        "other_key": (other, grafana_fpr, False),
        "extra_key": (grafana + other, grafana_fpr, False),
        "pinned_as_subkey": (wrapper, wrapped_fpr, False),
    }
    assert other_fpr != grafana_fpr
    hosts = {}
    for host, (key, pinned, _) in cases.items():
        (tmp_path / f"{host}.asc").write_text(key)
        hosts[host] = {
            "grafana_apt_key_url": f"file://{tmp_path}/{host}.asc",
            "grafana_apt_key_fingerprint": pinned,
            "grafana_apt_keyring": f"{tmp_path}/keyrings/{host}/grafana.asc",
        }
    tasks = [{"name": "Run the key tasks", "ansible.builtin.import_tasks": str(GRAFANA_ROLE / "tasks" / "apt_key.yml")}]
    output = _play(tmp_path, tasks, hosts, role=GRAFANA_ROLE)
    recap = _recap(output)
    for host, (key, _, trusted) in cases.items():
        keyring = tmp_path / "keyrings" / host / "grafana.asc"
        assert bool(recap[host]["failed"]) != trusted, f"{host}: expected trusted={trusted}\n{output}"
        if trusted:
            assert keyring.read_text() == key, f"{host}: the verified key was not installed"
        else:
            assert not keyring.exists(), f"{host}: an unverified key reached the keyring apt reads"
    again = _recap(_play(tmp_path, tasks, {"pinned": hosts["pinned"]}, role=GRAFANA_ROLE))
    assert (again["pinned"]["changed"], again["pinned"]["failed"]) == (0, 0), "a second run must change nothing"


# --- API keys: refused up front, written before the env file names it, reloaded only when safe

GOOD_CLIENT = {"id": "billing", "sha256": "b" * 64}
# host -> (falcon_svc_api_keys_enabled, falcon_svc_api_keys, whether the preflight must refuse it)
API_KEY_CASES = {
    "role_default_empty_list": (True, [], True),
    "keys_off_empty_list": (False, [], False),
    "one_client": (True, [GOOD_CLIENT], False),
    "dated_and_commented": (True, [{**GOOD_CLIENT, "created": "2026-12-01", "comment": "ops"}], False),
    "key_in_place_of_its_hash": (True, [{"id": "billing", "sha256": "fsk_billing_" + "x" * 43}], True),
    "id_twice": (True, [GOOD_CLIENT, {**GOOD_CLIENT, "sha256": "c" * 64}], True),
    "bad_date": (True, [{**GOOD_CLIENT, "created": "yesterday"}], True),
}


def test_api_keys_are_refused_in_preflight_before_anything_changes(tmp_path: Path) -> None:
    """An empty or malformed key list fails the run before the host changes.

    Refused later, after configure.yml wrote API_KEYS_FILE into the env file, the
    rolling restart (force_handlers) brought up workers that found no key file, exited
    78 and stayed down. So: the assert lives in preflight.yml, and the key file is
    written before the env file names it.
    """
    hosts = {
        host: {
            **TEST_SECRETS,
            "falcon_svc_source_dir": str(REPO_ROOT),
            "falcon_svc_api_keys_enabled": enabled,
            "falcon_svc_api_keys": clients,
        }
        for host, (enabled, clients, _) in API_KEY_CASES.items()
    }
    tasks = [
        {"name": "Run the role's preflight", "ansible.builtin.import_tasks": str(FALCON_ROLE / "tasks/preflight.yml")}
    ]
    output = _play(tmp_path, tasks, hosts)
    recap = _recap(output)
    for host, (_, _, refused) in API_KEY_CASES.items():
        assert bool(recap[host]["failed"]) == refused, f"{host}: expected refused={refused}\n{output}"
        assert recap[host]["changed"] == 0, f"{host}: the preflight changed something\n{output}"
    assert "fsk_billing_" not in output, "the preflight printed a key"

    imports = [task.get("ansible.builtin.import_tasks") for task in _yaml_list(FALCON_ROLE / "tasks/main.yml")]
    order = [name for name in imports if name]
    assert order.index("preflight.yml") < order.index("install.yml") < order.index("api_keys.yml"), order
    assert order.index("api_keys.yml") < order.index("configure.yml"), (
        f"api_keys.yml must write the key file before configure.yml's env file names it: {order}"
    )
    asserts = [task for task in _yaml_list(FALCON_ROLE / "tasks/api_keys.yml") if "ansible.builtin.assert" in task]
    assert not asserts, "api_keys.yml asserts: an assert after install.yml has changed the host already"


def test_api_key_file_keeps_every_field_the_inventory_gives(tmp_path: Path) -> None:
    """api_keys.j2 writes what falcon_svc.auth.keys parses back: ids, hashes, dates and comments."""
    from falcon_svc.auth.keys import KeyRecord, read_key_file

    clients = [
        {"id": "plain", "sha256": "a" * 64},
        {"id": "dated", "sha256": "b" * 64, "created": "2026-12-01"},
        {"id": "both", "sha256": "c" * 64, "created": "2026-12-01", "comment": "ops  team\nlaptop"},
        {"id": "undated.comment", "sha256": "d" * 64, "comment": "billing batch"},
    ]
    tasks = [
        {
            "name": "Write the key file as the role does",
            "ansible.builtin.template": {
                "src": str(FALCON_ROLE / "templates/api_keys.j2"),
                "dest": f"{tmp_path}/api_keys",
                "mode": "0600",
            },
        }
    ]
    output = _play(tmp_path, tasks, {"host": {"falcon_svc_api_keys": clients}})
    assert _recap(output)["host"]["failed"] == 0, output
    assert read_key_file(tmp_path / "api_keys") == [
        KeyRecord("plain", "a" * 64),
        KeyRecord("dated", "b" * 64, "2026-12-01"),
        KeyRecord("both", "c" * 64, "2026-12-01", "ops team laptop"),
        KeyRecord("undated.comment", "d" * 64, "", "billing batch"),
    ]


def _fake_systemctl(tmp_path: Path, main_pids: dict[int, int]) -> Path:
    """A ``systemctl`` that answers MainPID from ``main_pids`` (port -> pid) and logs the rest.

    NOTE: this machine runs no systemd (the e2e host does). The processes behind the
    pids are real, so the role's ``ps`` and ``stat`` read real start times and mtimes.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    cases = "\n".join(f"  *falcon-worker@{port}.service) echo {pid} ;;" for port, pid in main_pids.items())
    script = bin_dir / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'if [ "$1" = show ]; then\n'
        '  case "$*" in\n'
        f"{cases}\n"
        "  *) echo 0 ;;\n"
        "  esac\n"
        "fi\n"
    )
    script.chmod(0o755)
    return bin_dir


def test_key_reload_spares_masters_older_than_the_installed_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key change reloads only masters that run the installed code; the others get the rolling restart.

    A HUP to a master started before an upgrade forks workers that mix its old modules
    with the new ones on disk: on the first upgrade to API keys every worker failed to
    boot and every master exited (502 everywhere). Such a master must not be reloaded;
    the restart handler (one worker at a time) applies the keys instead.
    """
    masters = [subprocess.Popen(["sleep", "600"]) for _ in range(3)]  # a plain long-lived process
    try:
        now = int(time.time())
        # host -> (its worker ports with the pid of each running master, site-packages mtime)
        hosts_setup = {
            "code_older_than_masters": ({18001: masters[0].pid, 18002: masters[1].pid}, now - 3600),
            "upgraded_in_this_run": ({18011: masters[2].pid}, now + 5),
            "first_run_nothing_running": ({18021: 0}, now - 3600),
        }
        pids = {port: pid for ports, _ in hosts_setup.values() for port, pid in ports.items() if pid}
        monkeypatch.setenv("PATH", f"{_fake_systemctl(tmp_path, pids)}:{os.environ['PATH']}")
        hosts = {}
        for host, (ports, mtime) in hosts_setup.items():
            site_packages = tmp_path / host / "venv/lib/python3.11/site-packages"
            site_packages.mkdir(parents=True)
            os.utime(site_packages, (mtime, mtime))
            hosts[host] = {
                "falcon_svc_venv": str(tmp_path / host / "venv"),
                "falcon_svc_worker_ports": list(ports),
                "falcon_svc_group": grp.getgrgid(os.getgid()).gr_name,
                "_falcon_svc_api_keys_file": str(tmp_path / host / "api_keys"),
                "falcon_svc_api_keys": [GOOD_CLIENT],
            }
        tasks = [
            {
                "name": "Run the role's key tasks",
                "ansible.builtin.import_tasks": str(FALCON_ROLE / "tasks/api_keys.yml"),
            }
        ]
        (tmp_path / "templates").symlink_to(FALCON_ROLE / "templates")  # found as the role finds them
        first = _play(tmp_path, tasks, hosts)
        assert all(counts["failed"] == 0 for counts in _recap(first).values()), first
        log = tmp_path / "systemctl.log"
        reloads = sorted(line for line in log.read_text().splitlines() if not line.startswith("show"))
        assert reloads == [
            "try-reload-or-restart falcon-worker@18001.service",
            "try-reload-or-restart falcon-worker@18002.service",
        ], f"expected a reload of the masters running the installed code only\n{first}"
        handler = first.split("RUNNING HANDLER [Restart falcon workers]", 1)
        assert len(handler) == 2 and "[upgraded_in_this_run]" in handler[1], f"no rolling restart\n{first}"
        assert "[code_older_than_masters]" not in handler[1], f"a restart after a safe reload\n{first}"

        log.unlink()
        second = _play(tmp_path, tasks, hosts)
        assert all(counts["changed"] == 0 for counts in _recap(second).values()), f"not idempotent\n{second}"
        assert not log.exists(), f"an unchanged key file still touched the workers: {log.read_text()}"
    finally:
        for master in masters:
            master.kill()
            master.wait()


# --- The model store and deploy-model.yml -------------------------------------------------


def _fake_falcon_svc(path: Path, store: Path, canary_exit: int = 0) -> Path:
    """A ``falcon-svc`` that logs its arguments and does to ``store`` what the real one would.

    ``models import DIR`` stores DIR's version (and points ``active`` at it with --activate);
    ``models canary`` prints an evidence line and exits ``canary_exit``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'echo "MODEL_STORE=$MODEL_STORE $*" >> "$0.log"\n'
        'case "$1 $2" in\n'
        '  "models import")\n'
        '    version=$(sed -n \'s/.*"version": "\\([^"]*\\)".*/\\1/p\' "$3/metadata.json")\n'
        f'    mkdir -p {store}/versions/"$version"\n'
        f'    [ "$4" = --activate ] && ln -sfn versions/"$version" {store}/active\n'
        "    exit 0 ;;\n"
        '  "models canary")\n'
        '    echo "predicted-label mix  neg 0.99  neg 0.33  FAIL"\n'
        f"    exit {canary_exit} ;;\n"
        "esac\n"
    )
    path.chmod(0o755)
    return path


def _artifact(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text(f'{{"version": "{version}"}}')
    (directory / "model.joblib").write_bytes(b"model bytes of " + version.encode())
    return directory


def test_the_role_imports_its_model_and_activates_it_only_while_none_is_active(tmp_path: Path) -> None:
    """A rerun of site.yml must not undo a rollout: the store's active version stays the operator's."""
    setups = {
        "empty_store": ([], None, ["models", "import", "--activate"]),
        "model_stored_and_active": (["v1"], "v1", None),
        "another_version_active": (["v0"], "v0", ["models", "import"]),
    }
    hosts = {}
    for host, (stored, active, _) in setups.items():
        store = tmp_path / host / "store"
        for version in stored:
            (store / "versions" / version).mkdir(parents=True)
        if active:
            (store / "active").symlink_to(f"versions/{active}")
        hosts[host] = {
            "_falcon_svc_bin": str(_fake_falcon_svc(tmp_path / host / "falcon-svc", store)),
            "falcon_svc_model_dir": str(_artifact(tmp_path / host / "model", "v1")),
            "falcon_svc_model_store": str(store),
            "ansible_become": False,
        }
    tasks = [
        {"name": "Run the store tasks", "ansible.builtin.import_tasks": str(FALCON_ROLE / "tasks/model_store.yml")}
    ]
    recap = _recap(output := _play(tmp_path, tasks, hosts))
    for host, (_, _, command) in setups.items():
        log = tmp_path / host / "falcon-svc.log"
        if command is None:
            assert not log.exists() and recap[host]["changed"] == 0, f"{host}: nothing to import\n{output}"
            continue
        model_dir, store = hosts[host]["falcon_svc_model_dir"], hosts[host]["falcon_svc_model_store"]
        expected = f"MODEL_STORE={store} {' '.join(command[:2])} {model_dir}" + (
            " --activate" if "--activate" in command else ""
        )
        assert log.read_text().splitlines() == [expected], f"{host}\n{output}"
        assert recap[host]["failed"] == 0 and recap[host]["changed"] >= 1, f"{host}\n{output}"
    assert os.readlink(tmp_path / "another_version_active/store/active") == "versions/v0", "the rollout was undone"
    rerun = _recap(second := _play(tmp_path, tasks, hosts))
    assert all(counts["changed"] == 0 for counts in rerun.values()), f"not idempotent\n{second}"


def test_deploy_model_pins_the_signature_to_the_controller_and_fails_on_a_rollback(tmp_path: Path) -> None:
    """The host signs what the controller sent (sha256 pinned), imports it, and a canary's rollback fails the host."""
    import hashlib

    artifact = _artifact(tmp_path / "controller" / "v2", "v2")
    (artifact / "signature.json").write_text("{}")  # made elsewhere: must not be shipped
    sums = {
        name: hashlib.sha256((artifact / name).read_bytes()).hexdigest() for name in ("metadata.json", "model.joblib")
    }
    hosts = {}
    for host, canary_exit in {"promoted": 0, "rolled_back": 1}.items():
        store = tmp_path / host / "store"
        store.mkdir(parents=True)
        hosts[host] = {
            "_falcon_svc_bin": str(_fake_falcon_svc(tmp_path / host / "falcon-svc", store, canary_exit)),
            "falcon_svc_model_store": str(store),
            "falcon_svc_deploy_model_src": str(artifact),
            "falcon_svc_deploy_model_version": "v2",
            "falcon_svc_deploy_canary_window": 7,
            "falcon_svc_worker_ports": [18001, 18002],
            "ansible_become": False,
        }
    hosts["rolled_back"] |= {"falcon_svc_deploy_force": True, "falcon_svc_deploy_force_reason": "drill"}
    hosts["no_version_given"] = {**hosts["promoted"], "falcon_svc_deploy_model_version": "v9"}
    tasks = [{"name": "Deploy", "ansible.builtin.import_tasks": str(FALCON_ROLE / "tasks/deploy_model.yml")}]
    recap = _recap(output := _play(tmp_path, tasks, hosts))
    assert (recap["promoted"]["failed"], recap["rolled_back"]["failed"], recap["no_version_given"]["failed"]) == (
        0,
        1,
        1,
    ), output
    assert "VERSION its metadata's version (it says v2, given v9)" in output, output
    assert "v2 was not rolled out on rolled_back" in output and "neg 0.99" in output, "no evidence printed"
    for host in ("promoted", "rolled_back"):
        sign, import_, canary = (tmp_path / host / "falcon-svc.log").read_text().splitlines()
        assert sign.split()[1:3] == ["model", "sign"], sign
        assert f"--expect-sha256 metadata.json={sums['metadata.json']}" in sign, sign
        assert f"--expect-sha256 model.joblib={sums['model.joblib']}" in sign, sign
        assert import_.split()[1:3] == ["models", "import"], import_
        force = " --force --reason drill" if host == "rolled_back" else ""
        assert canary.endswith(
            f"models canary v2 --ports 18001,18002 --prometheus http://127.0.0.1:9090 --window 7{force}"
        )
        assert list((tmp_path / host / "store").iterdir()) == [tmp_path / host / "store" / "versions"], (
            "the staging directory was left behind"
        )
    # The staged copy never held the foreign signature: it was not among the files copied.
    assert (
        "signature.json" not in output.split("Copy the artifact into the staging directory", 1)[1].split("TASK", 1)[0]
    )
