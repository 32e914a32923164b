"""Check the Ansible roles in ansible/: layout, meta, argument specs, syntax and lint,
the env file the falcon_svc role writes against the service's settings, and how the role
judges training.

The tools live in their own venv (`make deploy-tools` builds .venv-deploy from
requirements-deploy.txt; ANSIBLE_BIN_DIR points elsewhere). Missing tools make these
tests fail, not skip: CI must check the deployment code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from falcon_svc.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO_ROOT / "ansible"
ROLES = sorted(p for p in (ANSIBLE_DIR / "roles").iterdir() if p.is_dir())
TEMPLATES = sorted((ANSIBLE_DIR / "roles").glob("*/templates/**/*.j2"))
# A relative ANSIBLE_BIN_DIR is taken from the repo root (the tools run in ansible/).
BIN_DIR = REPO_ROOT / os.environ.get("ANSIBLE_BIN_DIR", ".venv-deploy/bin")
SITE_ROLES = [
    "common",
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
    site = yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())
    assert [r["role"] for r in site[0]["roles"]] == SITE_ROLES
    assert sorted(SITE_ROLES) == [r.name for r in ROLES]


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


def test_syntax_check() -> None:
    result = _run(_tool("ansible-playbook"), "--syntax-check", "-i", "inventory.example.ini", "site.yml")
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


def _play(tmp_path: Path, tasks: list[dict[str, Any]], hosts: dict[str, dict[str, Any]]) -> str:
    """Run ``tasks`` on local hosts that have the falcon_svc role's defaults and vars plus their own.

    The role's variables go in as group vars, so each host's own vars win over them.
    Returns the output, which ends with the play recap.
    """
    group_vars = {**_yaml(FALCON_ROLE / "defaults" / "main.yml"), **_yaml(FALCON_ROLE / "vars" / "main.yml")}
    group_vars |= {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts, "vars": group_vars}}))
    play = {"name": "Probe the falcon_svc role", "hosts": "all", "gather_facts": False, "tasks": tasks}
    play["handlers"] = [{"name": "Restart falcon workers", "ansible.builtin.debug": {"msg": "handler ran"}}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    result = _run(_tool("ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"))
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
            "--output-dir",
            "/srv/model",
        ]
        assert (bool(recap[host]["changed"]), bool(recap[host]["failed"])) == (changed, failed), (
            f"exit {code} ({host}): expected changed={changed} failed={failed}\n{output}"
        )
