"""The layout play (ansible/tasks/layout.yml) and the fleet's derived variables
(ansible/group_vars/falcon_fleet_hosts.yml), run by ansible-playbook on inventories of
each layout (issue 15).

A fleet's hosts get the cross-host values tests/ops/test_fleet_render.py renders into
the roles' files (FLEET_VARS there: that render and this derivation meet in one table);
one host in every group, or hosts only in [falcon], get none of them, so the roles'
defaults, byte-identical to the single-host files before the fleet, stand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_ansible import ANSIBLE_DIR, _recap, _run, _tool
from test_fleet_render import APP1, APP2, DATA, FLEET_VARS, LB, LOCAL

# Every variable the fleet's group_vars set (what a single host must not get).
DERIVED = sorted(name for name in yaml.safe_load((ANSIBLE_DIR / "group_vars" / "falcon_fleet_hosts.yml").read_text()))
SHOWN = ["group_names", *DERIVED]
FLEET_SECRETS = {
    "falcon_svc_log_text_hmac_secret": "hmac-secret-0123456789-0123456789",
    "falcon_svc_model_src": "/srv/models/sentiment",
}
ROLE_GROUPS = ("falcon_lb", "falcon_app", "falcon_data", "falcon_monitoring")


def _fleet_inventory(**app1_extra: Any) -> dict[str, Any]:
    """The issue-15 e2e layout: lb, app1, app2, data (also the monitoring host)."""
    address = {"lb": LB, "app1": APP1, "app2": APP2, "data": DATA}
    hosts = {name: {"falcon_private_address": ip} for name, ip in address.items()}
    hosts["app1"] |= app1_extra
    groups = {
        "falcon_lb": ["lb"],
        "falcon_app": ["app1", "app2"],
        "falcon_data": ["data"],
        "falcon_monitoring": ["data"],
    }
    return _groups_inventory(hosts, groups, FLEET_SECRETS)


def _groups_inventory(
    hosts: dict[str, dict[str, Any]], groups: dict[str, list[str]], all_vars: dict[str, Any] | None = None
) -> dict[str, Any]:
    children = {name: {"hosts": {host: None for host in members}} for name, members in groups.items()}
    return {
        "all": {
            "vars": {**LOCAL, **(all_vars or {})},
            "hosts": hosts,
            "children": {"falcon": {"children": children}},
        }
    }


def run_layout(tmp_path: Path, inventory: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str]:
    """Run the layout play, then write each host's view of the derived variables ("UNSET" when undefined)."""
    # The group_vars beside the inventory: the playbook's own (ansible/group_vars), as site.yml sees them.
    (tmp_path / "group_vars").symlink_to(ANSIBLE_DIR / "group_vars")
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    dump = {
        "name": "Show what each host sees",
        "hosts": "falcon_standalone:" + ":".join(ROLE_GROUPS),
        "gather_facts": False,
        "tasks": [
            {
                "name": "Write the variables",
                "ansible.builtin.copy": {
                    "dest": f"{tmp_path}/{{{{ inventory_hostname }}}}.json",
                    "content": "{% set d = {} %}{% for n in shown %}"
                    "{% set _ = d.update({n: lookup('vars', n, default='UNSET')}) %}{% endfor %}{{ d | to_json }}",
                    "mode": "0644",
                },
                "vars": {"shown": SHOWN},
            }
        ],
    }
    layout = {
        "name": "Work out the layout",
        "hosts": "falcon:" + ":".join(ROLE_GROUPS),
        "gather_facts": False,
        "tasks": [{"name": "Check the layout", "ansible.builtin.import_tasks": str(ANSIBLE_DIR / "tasks/layout.yml")}],
    }
    (tmp_path / "play.yml").write_text(yaml.safe_dump([layout, dump], sort_keys=False))
    result = _run(_tool("ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"))
    seen = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    return seen, result.stdout + result.stderr


def test_fleet_hosts_get_the_cross_host_wiring(tmp_path: Path) -> None:
    seen, output = run_layout(tmp_path, _fleet_inventory())
    assert set(seen) == {"lb", "app1", "app2", "data"}, output
    assert all("falcon_fleet_hosts" in host["group_names"] for host in seen.values())
    app1, lb, data = seen["app1"], seen["lb"], seen["data"]
    # What the render test writes into the roles' files is exactly what the inventory derives.
    for name, value in FLEET_VARS.items():
        host = {"nginx": lb, "prometheus": data, "postgresql": data}.get(name.split("_")[0], app1)
        assert host[name] == value, f"{name}: derived {host[name]!r}, rendered with {value!r}"
    assert seen["app2"]["falcon_svc_bind_address"] == APP2
    assert seen["app2"]["falcon_svc_peer_addresses"] == [LB, DATA]
    assert lb["falcon_svc_peer_addresses"] == [DATA], "a host never lists itself"


def test_fleet_roles_run_where_their_service_is(tmp_path: Path) -> None:
    seen, _ = run_layout(tmp_path, _fleet_inventory())
    assert seen["lb"]["exporters_enabled"] == ["nginx"]
    assert seen["data"]["exporters_enabled"] == ["redis", "postgres"]
    assert seen["app1"]["exporters_enabled"] == []
    assert [seen[h]["falcon_svc_retention_enabled"] for h in ("app1", "app2")] == [True, False], "one retention job"
    assert seen["app1"]["falcon_svc_db_admin_host"] == "data", "GRANTs run where PostgreSQL is"
    assert seen["lb"]["nginx_web_source_dir"].endswith("/falcon_svc/web"), "the lb has no package to serve from"
    assert seen["app1"]["nginx_web_source_dir"] == ""
    for host in ("lb", "app1", "app2", "data"):
        address = {"lb": LB, "app1": APP1, "app2": APP2, "data": DATA}[host]
        assert seen[host]["node_exporter_listen_address"] == f"{address}:9100"
    assert seen["data"]["redis_bind"] == f"127.0.0.1 -::1 {DATA}"


@pytest.mark.parametrize(
    "layout",
    ["one host in every group", "hosts only in [falcon]"],
)
def test_single_hosts_get_none_of_the_fleet_variables(tmp_path: Path, layout: str) -> None:
    """The roles' defaults stand: the golden single-host files of test_fleet_render are what they write."""
    if layout == "one host in every group":
        inventory = _groups_inventory({"falcon-01": {}}, {group: ["falcon-01"] for group in ROLE_GROUPS})
        expected_hosts = {"falcon-01"}
    else:
        # Two independent installations, as an inventory from before the groups could list.
        inventory = _groups_inventory({"one": {}, "two": {}}, {})
        inventory["all"]["children"] = {"falcon": {"hosts": {"one": None, "two": None}}}
        expected_hosts = {"one", "two"}
    seen, output = run_layout(tmp_path, inventory)
    assert set(seen) == expected_hosts, output
    for host, variables in seen.items():
        assert "falcon_fleet_hosts" not in variables["group_names"]
        defined = {name for name in DERIVED if variables[name] != "UNSET"}
        assert not defined, f"{host} ({layout}) got fleet variables {sorted(defined)}"
    if layout == "hosts only in [falcon]":
        assert all("falcon_standalone" in v["group_names"] for v in seen.values()), "each runs every role"


def _failed(output: str) -> bool:
    recap = _recap(output)
    return bool(recap) and any(counts["failed"] for counts in recap.values())


def test_layout_refuses_a_role_group_without_hosts(tmp_path: Path) -> None:
    inventory = _fleet_inventory()
    del inventory["all"]["children"]["falcon"]["children"]["falcon_data"]
    seen, output = run_layout(tmp_path, inventory)
    assert _failed(output) and not seen, output
    assert "empty or missing: falcon_data" in output


def test_layout_refuses_a_fleet_host_without_its_private_address(tmp_path: Path) -> None:
    inventory = _fleet_inventory()
    del inventory["all"]["hosts"]["app2"]["falcon_private_address"]
    seen, output = run_layout(tmp_path, inventory)
    assert _failed(output) and "app2" not in seen, output
    assert "app2 is part of a fleet: it needs falcon_private_address" in output


@pytest.mark.parametrize("missing", ["falcon_svc_log_text_hmac_secret", "falcon_svc_model_src"])
def test_layout_refuses_several_app_hosts_without_one_key_and_one_model(tmp_path: Path, missing: str) -> None:
    inventory = _fleet_inventory()
    del inventory["all"]["vars"][missing]
    seen, output = run_layout(tmp_path, inventory)
    assert _failed(output) and "app1" not in seen and "app2" not in seen, output
    assert missing in output
    assert "lb" in seen, "hosts that are no app host are not held up"


def test_loopback_is_no_private_address(tmp_path: Path) -> None:
    seen, output = run_layout(tmp_path, _fleet_inventory(falcon_private_address="127.0.0.1"))
    assert _failed(output) and "app1" not in seen, output
