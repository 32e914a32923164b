"""Check the Ansible roles in ansible/: layout, argument specs, syntax and lint.

The tools live in their own venv (`make deploy-tools` builds .venv-deploy from
requirements-deploy.txt; ANSIBLE_BIN_DIR points elsewhere). Missing tools make these
tests fail, not skip: CI must check the deployment code.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
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
