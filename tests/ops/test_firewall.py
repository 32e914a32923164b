"""The firewall role (issue 15): each host of a fleet lets in only the flows of its groups.

The ruleset and the unit are rendered by the role's own tasks (read from tasks/configure.yml
with only their paths moved into a temporary directory, as tests/ops/test_fleet_render.py
does; the ruleset task's ``validate: nft -c`` runs too). Then the real thing: one network
namespace per host on a bridge in a namespace of its own, each host's ruleset loaded in its
namespace by the unit's own ExecStart and ExecReload commands, a listener on every port any role
uses on every host, and a connection from every host (and from an outsider in no group) to
every other host's every port. The outcome must be the issue's table of flows exactly: open
where a flow is allowed, a time-out (dropped, not refused: a listener is there) everywhere
else. The unit's ExecStop then takes the table away and leaves another tool's table alone.

Needs root (namespaces, nft), iproute2 and nftables: missing, a failure under CI, else a skip.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_ansible import ANSIBLE_DIR, _recap, _run, _tool, _yaml, _yaml_list
from test_fleet_render import APP1, APP2, DATA, LB, LOCAL
from tools import alive, require_tool, skip_or_fail, tools_required

ROLE = ANSIBLE_DIR / "roles" / "firewall"
MONITORING = "198.18.0.14"  # a monitoring host of its own (the split layout)
OUTSIDER = "198.18.0.50"  # in no group: the internet, or a stray machine on the network
Hosts = dict[str, tuple[str, list[str]]]  # host -> (its falcon_private_address, its groups)
LAYOUTS: dict[str, Hosts] = {
    # The issue-15 e2e fleet: data and monitoring on one host; the role's defaults.
    "e2e": {
        "lb": (LB, ["falcon_lb"]),
        "app1": (APP1, ["falcon_app"]),
        "app2": (APP2, ["falcon_app"]),
        "data": (DATA, ["falcon_data", "falcon_monitoring"]),
    },
    # Monitoring on a host of its own; ssh only from the outsider's /28, and extra rules.
    "split": {
        "lb": (LB, ["falcon_lb"]),
        "app1": (APP1, ["falcon_app"]),
        "app2": (APP2, ["falcon_app"]),
        "data": (DATA, ["falcon_data"]),
        "mon": (MONITORING, ["falcon_monitoring"]),
    },
    # Rendered only: no data and no monitoring host. A group without hosts lets nobody in.
    "partial": {"lb": (LB, ["falcon_lb"]), "app1": (APP1, ["falcon_app"])},
}
NAMESPACE_LAYOUTS = ("e2e", "split")  # the ones loaded in namespaces and probed
GRAFANA_RULE = {"port": 3000, "proto": "tcp", "sources": [f"{OUTSIDER}/32"], "comment": "Grafana from the operator"}
SYSLOG_RULE = {"port": 514, "proto": "udp", "comment": "syslog from anywhere"}
LAYOUT_VARS: dict[str, dict[str, dict[str, Any]]] = {
    "e2e": {},
    "partial": {},
    "split": {
        "all": {"firewall_ssh_networks": ["198.18.0.48/28"]},
        "mon": {"firewall_extra_rules": [GRAFANA_RULE]},
        "lb": {"firewall_extra_rules": [SYSLOG_RULE]},
    },
}

# The flows, written here apart from the role: (the target host's group, or None for
# every host; its ports; the groups a source must be in, or None for anywhere). The worker
# ports are ansible/group_vars/all.yml's (8001 and 8002).
GROUP_VARS = _yaml(ANSIBLE_DIR / "group_vars" / "all.yml")
BASE_PORT, WORKERS = GROUP_VARS["falcon_svc_base_port"], GROUP_VARS["falcon_svc_workers"]
FLOWS: list[tuple[str | None, tuple[int, ...], set[str] | None]] = [
    (None, (9100,), {"falcon_monitoring"}),
    ("falcon_lb", (80, 443), None),
    ("falcon_lb", (9113,), {"falcon_monitoring"}),
    ("falcon_app", tuple(range(BASE_PORT, BASE_PORT + WORKERS)), {"falcon_lb", "falcon_monitoring"}),
    ("falcon_data", (5432, 6379), {"falcon_app"}),
    ("falcon_data", (9121, 9187), {"falcon_monitoring"}),
]
# Per layout: the hosts ssh is allowed from (None: anywhere), and what its extra rules open:
# (target, source) -> ports.
SSH_FROM: dict[str, set[str] | None] = {"e2e": None, "split": {"outsider"}}
EXTRA_OPEN: dict[str, dict[tuple[str, str], set[int]]] = {"e2e": {}, "split": {("mon", "outsider"): {3000}}}
# Every port a flow names, and three no role needs (8080: nginx's loopback stub_status port;
# 9090: Prometheus, on the monitoring host's loopback; 3000: Grafana, open only by the split
# layout's extra rule).
PROBED_PORTS = sorted({22, 3000, 8080, 9090} | {port for _, ports, _ in FLOWS for port in ports})
CONNECT_TIMEOUT = 1.0
WORKERS_COMMENT = "worker units from the load balancer and the monitoring host"
# Another tool's table, as Docker or fail2ban would have: loading and stopping ours keep it.
OTHER_TABLE = "table ip other_tool"

LISTENER = """
import socket, sys
sockets = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(64)  # the kernel completes the handshakes: no accept() needed
    sockets.append(s)
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin
"""

PROBE = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
timeout, targets = float(sys.argv[1]), json.loads(sys.argv[2])

def probe(target):
    try:
        socket.create_connection(tuple(target), timeout=timeout).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as ex:
        return f"error: {ex}"

with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(probe, targets))))
"""


@pytest.fixture(scope="module")
def nft() -> str:
    if os.geteuid() != 0:
        skip_or_fail("the firewall tests need root (nft, network namespaces)", required=tools_required())
    return require_tool("nft", "nftables")


@pytest.fixture(scope="module")
def ip_tool() -> str:
    return require_tool("ip", "iproute2")


def _role_vars() -> dict[str, Any]:
    """The role's defaults and vars, as the role's tasks see them outside the role."""
    return _yaml(ROLE / "defaults" / "main.yml") | _yaml(ROLE / "vars" / "main.yml")


def _inventory(path: Path, hosts: dict[str, tuple[dict[str, Any], list[str]]], group_vars: dict[str, Any]) -> None:
    """Write a YAML inventory of local hosts, host -> (its vars, its groups); ``group_vars`` for all."""
    children: dict[str, dict[str, Any]] = {}
    for name, (_, groups) in hosts.items():
        for group in groups:
            children.setdefault(group, {"hosts": {}})["hosts"][name] = None
    group_vars = group_vars | LOCAL | {"ansible_pipelining": True}
    group_vars |= {"falcon_svc_base_port": BASE_PORT, "falcon_svc_workers": WORKERS}
    inventory = {"all": {"hosts": {n: v for n, (v, _) in hosts.items()}, "children": children, "vars": group_vars}}
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))


def _playbook(path: Path, tasks: list[dict[str, Any]]) -> None:
    play = {"name": "Probe the firewall role", "hosts": "all", "gather_facts": False, "tasks": tasks}
    path.write_text(yaml.safe_dump([play], sort_keys=False))


def _ansible(out: Path, *args: str) -> str:
    """Run out/play.yml over out/inventory.yml; return its output (which ends with the recap)."""
    result = _run(_tool("ansible-playbook"), "-i", str(out / "inventory.yml"), *args, str(out / "play.yml"))
    assert "PLAY RECAP" in result.stdout, result.stdout + result.stderr
    return result.stdout


def _render(out: Path, layout: str) -> None:
    """The role's own preflight, ruleset and unit tasks, enabled, for every host of ``layout``, into ``out``.

    The role's private paths point into ``out`` (``<host>.nft``, ``<host>.service``): the
    unit's ExecStart then loads that host's rendered file.
    """
    out.mkdir(parents=True)
    hosts = {}
    for name, (address, groups) in LAYOUTS[layout].items():
        host_vars = {"falcon_private_address": address} | LAYOUT_VARS[layout].get("all", {})
        hosts[name] = (host_vars | LAYOUT_VARS[layout].get(name, {}), groups)
    paths = {
        "_firewall_ruleset_path": f"{out}/{{{{ inventory_hostname }}}}.nft",
        "_firewall_unit_path": f"{out}/{{{{ inventory_hostname }}}}.service",
    }
    _inventory(out / "inventory.yml", hosts, _role_vars() | {"firewall_enabled": True} | paths)
    # Its preflight first: a valid fleet passes it.
    tasks = [{"name": "Run the preflight", "ansible.builtin.import_tasks": str(ROLE / "tasks" / "preflight.yml")}]
    for task in _yaml_list(ROLE / "tasks" / "configure.yml"):
        if task["name"] in ("Write the firewall ruleset", "Install the firewall's systemd unit"):
            args = task["ansible.builtin.template"] | {
                "src": str(ROLE / "templates" / task["ansible.builtin.template"]["src"])
            }
            tasks.append({"name": task["name"], "ansible.builtin.template": args})
    assert len(tasks) == 3, "configure.yml lost the ruleset or the unit task"
    _playbook(out / "play.yml", tasks)
    recap = _recap(_ansible(out))
    assert set(recap) == set(hosts) and all(counts["failed"] == 0 for counts in recap.values()), recap


@pytest.fixture(scope="module")
def rendered(nft: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both layouts' files, in ``<layout>/<host>.nft`` and ``.service`` (the two runs in parallel)."""
    root = tmp_path_factory.mktemp("firewall")
    with ThreadPoolExecutor(len(LAYOUTS)) as pool:
        list(pool.map(lambda layout: _render(root / layout, layout), LAYOUTS))
    return root


def _unit_commands(unit: Path) -> dict[str, list[str]]:
    """ExecStart, ExecReload and ExecStop of a unit, as argument lists (systemd's "-" dropped)."""
    keys = ("ExecStart", "ExecReload", "ExecStop")
    lines = dict(line.split("=", 1) for line in unit.read_text().splitlines() if line.startswith(keys))
    return {key: shlex.split(lines[key].removeprefix("-")) for key in keys}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_hosts_ruleset_passes_nft_check(rendered: Path, nft: str, layout: str) -> None:
    for host in LAYOUTS[layout]:
        path = rendered / layout / f"{host}.nft"
        result = subprocess.run([nft, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{layout}/{host}: nft -c rejects the ruleset:\n{result.stderr}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ruleset_touches_only_its_own_table_and_replaces_it_whole(rendered: Path, layout: str) -> None:
    for host in LAYOUTS[layout]:
        text = (rendered / layout / f"{host}.nft").read_text()
        statements = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert statements[:2] == ["table inet falcon_firewall {}", "delete table inet falcon_firewall"], statements[:3]
        assert not [line for line in statements if line.startswith("flush")], f"{host}: flushes other tools' tables"
        tables = [line for line in statements if line.startswith("table ")]
        assert tables == ["table inet falcon_firewall {}", "table inet falcon_firewall {"], tables
        assert "policy drop;" in text and 'log prefix "falcon-firewall drop: "' in text


def test_extra_rules_and_ssh_networks_reach_the_ruleset(rendered: Path) -> None:
    """The udp extra rule (the namespace test probes tcp only) and ssh's networks, as written."""
    lb = (rendered / "split" / "lb.nft").read_text()
    assert 'udp dport { 514 } accept comment "syslog from anywhere"' in lb, lb
    assert 'ip saddr { 198.18.0.48/28 } tcp dport { 22 } accept comment "ssh"' in lb, lb
    assert 'tcp dport { 22 } accept comment "ssh"' in (rendered / "e2e" / "lb.nft").read_text(), "ssh from anywhere"


def test_a_group_without_hosts_lets_nobody_in(rendered: Path) -> None:
    """No monitoring host: no exporter port is open (to anyone); the workers only to the load balancer."""
    lb, app = ((rendered / "partial" / f"{host}.nft").read_text() for host in ("lb", "app1"))
    for text in (lb, app):
        assert "9100" not in text and "9113" not in text, text
    workers = [line.strip() for line in app.splitlines() if "dport { 8001, 8002 }" in line]
    assert workers == [f'ip saddr {{ {LB}/32 }} tcp dport {{ 8001, 8002 }} accept comment "{WORKERS_COMMENT}"'], app


def test_unit_loads_early_and_replaces_or_deletes_only_its_table(rendered: Path) -> None:
    unit = (rendered / "e2e" / "data.service").read_text()
    for line in ("Type=oneshot", "RemainAfterExit=yes", "Before=network-pre.target", "After=nftables.service"):
        assert line in unit.splitlines(), f"the unit lacks {line}"
    assert "Wants=network-pre.target" in unit.splitlines() and "WantedBy=sysinit.target" in unit.splitlines()
    commands = _unit_commands(rendered / "e2e" / "data.service")
    ruleset = str(rendered / "e2e" / "data.nft")
    assert commands["ExecStart"] == commands["ExecReload"] == ["/usr/sbin/nft", "-f", ruleset], commands
    assert commands["ExecStop"] == ["/usr/sbin/nft", "delete", "table", "inet", "falcon_firewall"], commands


def test_systemd_analyze_verify_is_silent(rendered: Path, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(rendered / "e2e" / "data.service", units / "falcon-firewall.service")
    stand_in = tmp_path / "usr/sbin/nft"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    result = subprocess.run(
        [analyze, "verify", f"--root={tmp_path}", "falcon-firewall.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


# --- The real thing: the rulesets loaded in network namespaces on one bridge -----------------


def _expected_open(layout: str, target: str, source: str) -> set[int]:
    """The ports of ``target`` that ``source`` may connect to: FLOWS, ssh and the extra rules.

    A host reaches all of its own ports on its private address (the role's readiness checks
    do): that traffic goes over loopback.
    """
    hosts = LAYOUTS[layout]
    if target == source:
        return set(PROBED_PORTS)
    target_groups = set(hosts[target][1])
    source_groups = set(hosts[source][1]) if source in hosts else set()
    ssh_from = SSH_FROM[layout]
    ports = {22} if ssh_from is None or source in ssh_from else set()
    for group, flow_ports, sources in FLOWS:
        if (group is None or group in target_groups) and (sources is None or sources & source_groups):
            ports |= set(flow_ports)
    return ports | EXTRA_OPEN[layout].get((target, source), set())


def _sh(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result.stdout


def _remove_stale_namespaces(ip: str) -> None:
    """Delete namespaces an earlier run of this test left when it was killed (its pid is gone)."""
    listing = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, timeout=30, check=False).stdout
    for name in (line.split()[0] for line in listing.splitlines() if line.startswith("fwt-")):
        pid = name.split("-")[1]
        if pid.isdigit() and not alive(int(pid)):
            subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def network(ip_tool: str, request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """Namespaces ``fwt-<pid>-<host>`` for the layout ``request.param``'s hosts and an outsider,
    on a bridge in a namespace of its own; yields the layout and host -> namespace.

    Nothing touches this machine's own network namespace. The namespaces (and with them the
    links and the rulesets) are removed whatever the test's outcome, and /run/netns is
    unmounted again if this made it a mount point and nothing else uses it.
    """
    netns_was_mounted = os.path.ismount("/run/netns")
    _remove_stale_namespaces(ip_tool)
    prefix = f"fwt-{os.getpid()}"
    switch = f"{prefix}-switch"
    addresses = {name: address for name, (address, _) in LAYOUTS[request.param].items()} | {"outsider": OUTSIDER}
    namespaces = {name: f"{prefix}-{name}" for name in addresses}
    made: list[str] = []
    try:
        for namespace in [switch, *namespaces.values()]:
            _sh(ip_tool, "netns", "add", namespace)
            made.append(namespace)
        _sh(ip_tool, "-n", switch, "link", "add", "br0", "type", "bridge")
        _sh(ip_tool, "-n", switch, "link", "set", "br0", "up")
        for name, namespace in namespaces.items():
            port = f"v-{name}"
            _sh(ip_tool, "-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", switch)
            _sh(ip_tool, "-n", switch, "link", "set", port, "master", "br0", "up")
            _sh(ip_tool, "-n", namespace, "addr", "add", f"{addresses[name]}/24", "dev", "eth0")
            _sh(ip_tool, "-n", namespace, "link", "set", "eth0", "up")
            _sh(ip_tool, "-n", namespace, "link", "set", "lo", "up")
        yield request.param, namespaces
    finally:
        for namespace in reversed(made):
            subprocess.run([ip_tool, "netns", "del", namespace], capture_output=True, timeout=30, check=False)
        listing = subprocess.run([ip_tool, "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
        if not netns_was_mounted and os.path.ismount("/run/netns") and not listing.stdout.strip():
            subprocess.run(["umount", "/run/netns"], capture_output=True, timeout=30, check=False)


@pytest.fixture
def listeners(network: tuple[str, dict[str, str]], ip_tool: str) -> Iterator[None]:
    """In every host's namespace (not the outsider's), a listener on every probed port."""
    processes = []
    try:
        for name, namespace in network[1].items():
            if name == "outsider":
                continue
            command = [ip_tool, "netns", "exec", namespace, sys.executable, "-c", LISTENER, *map(str, PROBED_PORTS)]
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            processes.append(process)
            ready = process.stdout.readline().strip() if process.stdout else ""
            assert ready == "ready", f"{name}: the listener did not start"
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


def _probe(ip: str, namespaces: dict[str, str], source: str, targets: list[tuple[str, int]]) -> list[str]:
    """From ``source``'s namespace, connect to every (address, port) at once: open, refused or timeout."""
    payload = json.dumps(targets)
    command = [ip, "netns", "exec", namespaces[source], sys.executable, "-c", PROBE, str(CONNECT_TIMEOUT), payload]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("network", NAMESPACE_LAYOUTS, indirect=True)
def test_each_host_lets_in_exactly_the_flows_of_its_groups(
    network: tuple[str, dict[str, str]], listeners: None, rendered: Path, ip_tool: str, nft: str
) -> None:
    """Every source to every host's every port: open as FLOWS say, else dropped (a time-out)."""
    layout, namespaces = network
    hosts = LAYOUTS[layout]
    for host in hosts:
        commands = _unit_commands(rendered / layout / f"{host}.service")
        _sh(ip_tool, "netns", "exec", namespaces[host], nft, "add", *OTHER_TABLE.split())
        # As systemd would run them: start, then a reload, which must replace the table whole.
        _sh(ip_tool, "netns", "exec", namespaces[host], *commands["ExecStart"])
        _sh(ip_tool, "netns", "exec", namespaces[host], *commands["ExecReload"])

    def probe_from(source: str) -> tuple[str, dict[tuple[str, int], str]]:
        targets = [(target, port) for target in hosts for port in PROBED_PORTS]
        outcomes = _probe(ip_tool, namespaces, source, [(hosts[target][0], port) for target, port in targets])
        return source, dict(zip(targets, outcomes, strict=True))

    with ThreadPoolExecutor(len(namespaces)) as pool:
        observed = dict(pool.map(probe_from, namespaces))
    wrong = []
    for source, outcomes in observed.items():
        for (target, port), outcome in outcomes.items():
            expected = "open" if port in _expected_open(layout, target, source) else "timeout"
            if outcome != expected:
                wrong.append(f"{source} -> {target}:{port}: {outcome}, expected {expected}")
    assert not wrong, f"{len(wrong)} flows differ from the issue's table:\n" + "\n".join(wrong)

    for host in hosts:
        listing = _sh(ip_tool, "netns", "exec", namespaces[host], nft, "list", "ruleset")
        assert listing.count("table inet falcon_firewall") == 1 and listing.count('comment "ssh"') == 1, listing
        assert OTHER_TABLE in listing, f"{host}: loading the firewall removed another tool's table"
        _sh(
            ip_tool,
            "netns",
            "exec",
            namespaces[host],
            *_unit_commands(rendered / layout / f"{host}.service")["ExecStop"],
        )
        tables = _sh(ip_tool, "netns", "exec", namespaces[host], nft, "list", "tables").split("\n")
        assert [table for table in tables if table] == [OTHER_TABLE], f"{host}: after ExecStop: {tables}"
    # Stopped, the firewall is gone: what it dropped connects.
    assert _probe(ip_tool, namespaces, "lb", [(DATA, 5432)]) == ["open"], "lb still cannot reach 5432 after ExecStop"


# --- The whole role: preflight's refusals, and what it does while disabled ------------------

# host -> (its vars, its groups, the message its refusal must carry; None: not refused). All
# in one play of the whole role (the two runs of it this saves are most of this file's time):
# the disabled hosts `fresh` and `leftover` are app hosts without an address, so the enabled
# hosts whose own inputs are right still stop at the last check, which names those two.
ROLE_CASES: dict[str, tuple[dict[str, Any], list[str], str | None]] = {
    "fresh": ({}, ["falcon_app"], None),
    "leftover": ({}, ["falcon_app"], None),
    "fleet_lb": (
        {"falcon_private_address": LB, "firewall_enabled": True},
        ["falcon_lb"],
        "have no private IPv4 falcon_private_address, so the firewall could not let their flows in: fresh, leftover.",
    ),
    "fleet_app_with_extra_rule": (
        {"falcon_private_address": APP1, "firewall_enabled": True, "firewall_extra_rules": [GRAFANA_RULE]},
        ["falcon_app"],
        "have no private IPv4 falcon_private_address, so the firewall could not let their flows in: fresh, leftover.",
    ),
    "no_address": ({"firewall_enabled": True}, [], "whose falcon_private_address is not set"),
    # In no fleet group, so that the peers' check does not name them too.
    "loopback": (
        {"falcon_private_address": "127.0.0.1", "firewall_enabled": True},
        [],
        "whose falcon_private_address is 127.0.0.1",
    ),
    "ipv6_address": (
        {"falcon_private_address": "fd00::13", "firewall_enabled": True},
        [],
        "whose falcon_private_address is fd00::13",
    ),
    "in_no_group": ({"falcon_private_address": "198.18.0.20", "firewall_enabled": True}, [], "which is in none of"),
    "ssh_from_a_name": (
        {"falcon_private_address": "198.18.0.21", "firewall_enabled": True, "firewall_ssh_networks": ["office"]},
        ["falcon_lb"],
        "firewall_ssh_networks must list",
    ),
    "quote_in_comment": (
        {
            "falcon_private_address": "198.18.0.22",
            "firewall_enabled": True,
            "firewall_extra_rules": [{"port": 3000, "comment": 'say "hi"'}],
        },
        ["falcon_lb"],
        "Each of firewall_extra_rules is",
    ),
    "port_out_of_range": (
        {
            "falcon_private_address": "198.18.0.23",
            "firewall_enabled": True,
            "firewall_extra_rules": [{"port": 70000, "comment": "too high"}],
        },
        ["falcon_lb"],
        "Each of firewall_extra_rules is",
    ),
}


def _failure(output: str, host: str) -> str:
    """What ``host``'s failed task printed (its msg among it), whitespace collapsed; '' if none."""
    match = re.search(rf"^(?:fatal|failed): \[{re.escape(host)}\].*=>.*\n((?:[ \t]+.*\n)*)", output, re.MULTILINE)
    return " ".join(match[1].split()) if match else ""


@pytest.fixture(scope="module")
def role_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The whole role (import_role, its own defaults) over ROLE_CASES; its output and the files directory.

    The role's file paths point into a temporary directory (extra vars outrank role vars),
    where `leftover` has a ruleset an earlier enabled run left.
    """
    tmp_path = tmp_path_factory.mktemp("firewall-role")
    files = tmp_path / "files"
    files.mkdir()
    (files / "leftover.nft").write_text("table inet falcon_firewall {}\n")
    _inventory(tmp_path / "inventory.yml", {host: (v, groups) for host, (v, groups, _) in ROLE_CASES.items()}, {})
    _playbook(tmp_path / "play.yml", [{"name": "Run the role", "ansible.builtin.import_role": {"name": "firewall"}}])
    paths = {
        "_firewall_ruleset_path": f"{files}/{{{{ inventory_hostname }}}}.nft",
        "_firewall_unit_path": f"{files}/{{{{ inventory_hostname }}}}.service",
    }
    output = _ansible(tmp_path, "-e", json.dumps(paths))
    assert set(_recap(output)) == set(ROLE_CASES), output
    return output, files


def test_preflight_refuses_what_the_firewall_cannot_be_built_from(role_run: tuple[str, Path]) -> None:
    output, _ = role_run
    recap = _recap(output)
    for host, (_, _, message) in ROLE_CASES.items():
        failure = _failure(output, host)
        if message is None:
            assert recap[host]["failed"] == 0, f"{host} was refused: {failure}"
        else:
            assert recap[host]["failed"] == 1 and recap[host]["changed"] == 0, f"{host} was not refused:\n{output}"
            assert message in failure, f"{host}: the refusal does not say {message!r}: {failure}"


def test_disabled_by_default_the_role_writes_and_loads_nothing(role_run: tuple[str, Path]) -> None:
    """At its defaults the role needs no address, changes nothing, and removes a leftover ruleset.

    Stopping a unit an enabled run left needs systemd, which the e2e hosts have and this test
    does not.
    """
    output, files = role_run
    recap = _recap(output)
    assert recap["fresh"]["failed"] == 0 and recap["fresh"]["changed"] == 0, output
    assert recap["leftover"]["failed"] == 0 and recap["leftover"]["changed"] == 1, output
    assert not list(files.iterdir()), "the disabled role left or wrote files"
    for task in ("Install the nftables package", "Write the firewall ruleset", "Enable and start the host firewall"):
        section = output.split(f"TASK [firewall : {task}]", 1)[1].split("TASK [", 1)[0]
        assert "skipping: [fresh]" in section and "skipping: [leftover]" in section, f"{task} ran while disabled"
