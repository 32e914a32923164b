"""The roles' fleet variables (issue 15): at their defaults they change no byte of the
single-host files, and with a fleet's values they write the cross-host lines.

The files are rendered by the roles' own tasks (read from tasks/*.yml, with only their
destination, owner and notifications changed), so the variables' mapping onto the
templates is tested too, not a copy of it. The single-host renders are compared with
golden files in tests/ops/golden/single-host/, rendered from the roles as they were
before the fleet variables (git 59602e4) by this same harness: a change to them must be
deliberate. Regenerate with ``FALCON_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from psycopg.conninfo import conninfo_to_dict
from test_ansible import REPO_ROOT, TEST_SECRETS, _read_env_file, _recap, _run, _tool, _yaml, _yaml_list

from falcon_svc.settings import Settings

ROLES_DIR = REPO_ROOT / "ansible" / "roles"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden" / "single-host"
RENDERED_ROLES = ("nginx", "prometheus", "falcon_svc", "postgresql", "exporters", "node_exporter", "redis")
# The roles' file-writing tasks this harness runs, by role and task file: task name -> the
# file it writes in the host's directory (its dest or path replaced by that).
RENDER_TASKS = {
    ("nginx", "configure.yml"): {"Render the falcon-svc site": "falcon-svc.conf"},
    ("prometheus", "configure.yml"): {"Write prometheus.yml with the deployed worker targets": "prometheus.yml"},
    ("falcon_svc", "configure.yml"): {"Write the service configuration": "falcon-svc.env"},
    ("falcon_svc", "service.yml"): {
        "Write the drop-in that moves the worker units onto the private network": "10-fleet.conf",
        "Remove the private-network drop-in on a host whose units stay on loopback": "10-fleet.conf",
    },
    ("falcon_svc", "retention.yml"): {
        "Let the retention job reach a PostgreSQL on another host": "10-retention.conf",
        "Remove that drop-in where PostgreSQL is on this host": "10-retention.conf",
    },
    ("postgresql", "configure.yml"): {
        "Listen on the addresses of postgresql_listen_addresses": "10-falcon-listen.conf",
        "Remove the listen_addresses file when the package's default (localhost) stands": "10-falcon-listen.conf",
        "Allow the owner and writer roles to log in over TCP with scram-sha-256": "pg_hba.conf",
    },
}
GOLDEN_FILES = ("falcon-svc.conf", "prometheus.yml", "falcon-svc.env", "pg_hba.conf")
# The start of Debian 12's pg_hba.conf: the role inserts its lines before the first `host`.
PACKAGE_HBA = """local   all             postgres                                peer
local   all             all                                     peer
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
"""

# The fleet of the issue-15 e2e: lb .10, app1 .11, app2 .12, data and monitoring .13.
LB, APP1, APP2, DATA = "198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.13"
PORTS = [8001, 8002]
LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}


def _host_label(address: str, name: str, port: int) -> dict[str, Any]:
    return {"targets": [f"{address}:{port}"], "labels": {"host": name}}


FLEET_VARS: dict[str, Any] = {
    # The load balancer: both app hosts' units, and as many tries as units (more than one
    # host has), so a host that died with both its units cannot use up a request's tries.
    "nginx_upstream_servers": [f"{address}:{port}" for address in (APP1, APP2) for port in PORTS],
    "nginx_next_upstream_tries": 2 * len(PORTS),
    # A request stuck on a host that went silent is passed on before proxy_next_upstream_timeout.
    "nginx_proxy_read_timeout": "5s",
    # The monitoring host: every host's exporters and units, each with its host label.
    "prometheus_job_targets": {
        "falcon": [
            {"targets": [f"{address}:{port}" for port in PORTS], "labels": {"host": name}}
            for name, address in (("app1", APP1), ("app2", APP2))
        ],
        "node": [
            _host_label(address, name, 9100)
            for name, address in (("lb", LB), ("app1", APP1), ("app2", APP2), ("data", DATA))
        ],
        "nginx": [_host_label(LB, "lb", 9113)],
        "redis": [_host_label(DATA, "data", 9121)],
        "postgres": [_host_label(DATA, "data", 9187)],
    },
    # app1: listens on its private address, talks to lb, data and monitoring.
    "falcon_svc_bind_address": APP1,
    "falcon_svc_peer_addresses": [LB, DATA],
    "falcon_svc_metrics_networks": [f"{DATA}/32"],
    "falcon_svc_db_host": DATA,
    "falcon_svc_redis_host": DATA,
    # The data host: listens on its private address and lets the app hosts in.
    "postgresql_listen_addresses": f"localhost,{DATA}",
    "postgresql_hba_networks": ["127.0.0.1/32", "::1/128", f"{APP1}/32", f"{APP2}/32"],
}


# TLS to the data host (docs/SCALING.md): controller paths; rendering the files reads none of them.
TLS_VARS: dict[str, Any] = {
    "postgresql_tls_cert_src": "/srv/tls/data.crt",
    "postgresql_tls_key_src": "/srv/tls/data.key",
    "falcon_svc_db_tls_ca_src": "/srv/tls/ca.crt",
    "falcon_svc_redis_tls_ca_src": "/srv/tls/ca.crt",
}


def _role_vars(root: Path) -> dict[str, Any]:
    """The roles' defaults and vars, as the play sees them (host vars win over these)."""
    merged: dict[str, Any] = {}
    for role in RENDERED_ROLES:
        for part in ("defaults", "vars"):
            path = root / "ansible" / "roles" / role / part / "main.yml"
            if path.is_file():
                merged |= _yaml(path)
    return merged


def _render_tasks(root: Path, out: Path) -> list[dict[str, Any]]:
    """The roles' tasks that write the files, from ``root``'s roles, writing into ``out/<host>/``.

    A task that ``root`` lacks (the fleet tasks, before they existed) is left out.
    """
    tasks = []
    for (role, task_file), outputs in RENDER_TASKS.items():
        role_dir = root / "ansible" / "roles" / role
        for original in _yaml_list(role_dir / "tasks" / task_file):
            if original.get("name") not in outputs:
                continue
            task = {key: value for key, value in original.items() if key not in ("notify", "no_log")}
            module = next(key for key in task if key.startswith("ansible.builtin."))
            args = {key: value for key, value in task[module].items() if key not in ("owner", "group", "validate")}
            args["dest" if "dest" in args else "path"] = f"{out}/{{{{ inventory_hostname }}}}/{outputs[task['name']]}"
            if "src" in args and "{{" not in args["src"]:
                args["src"] = str(role_dir / "templates" / args["src"])
            task[module] = args
            tasks.append(task)
    return tasks


def render(root: Path, out: Path, hosts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Render the files of ``root``'s roles for ``hosts`` into ``out/<host>/``; returns the play recap."""
    for host, host_vars in hosts.items():
        (out / host).mkdir(parents=True)
        (out / host / "pg_hba.conf").write_text(PACKAGE_HBA)
        host_vars |= {
            "nginx_site_template": str(root / "nginx" / "falcon-svc.conf.j2"),
            "prometheus_source_config": str(root / "prometheus" / "prometheus.yml"),
            "falcon_svc_log_text_hmac_secret": "hmac-secret-0123456789-0123456789",
        }
    group_vars = _role_vars(root) | LOCAL
    inventory = out / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": hosts, "vars": group_vars}}))
    play = {"name": "Render the roles' files", "hosts": "all", "gather_facts": False, "tasks": _render_tasks(root, out)}
    (out / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    result = _run(_tool("ansible-playbook"), "-i", str(inventory), str(out / "play.yml"))
    recap = _recap(result.stdout)
    assert recap and all(counts["failed"] == 0 for counts in recap.values()), result.stdout + result.stderr
    return recap


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's roles rendered for a single host (role defaults) and for app1 of the fleet."""
    out = tmp_path_factory.mktemp("fleet-render")
    render(
        REPO_ROOT,
        out,
        {
            "single": {**TEST_SECRETS},
            "fleet": {**TEST_SECRETS, **FLEET_VARS},
            "fleet_tls": {**TEST_SECRETS, **FLEET_VARS, **TLS_VARS},
        },
    )
    return out


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_single_host_render_is_byte_identical_to_the_golden(rendered: Path, name: str) -> None:
    """With the fleet variables at their defaults, the single host's files are those before them."""
    written = (rendered / "single" / name).read_bytes()
    golden = GOLDEN_DIR / name
    if os.environ.get("FALCON_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(written)
    assert written == golden.read_bytes(), f"the single-host {name} changed: deliberate? see this module's docstring"


def test_single_host_gets_no_fleet_drop_in_and_no_listen_file(rendered: Path) -> None:
    """Files that exist only on a fleet are not written (or left behind) on one host."""
    assert not (rendered / "single" / "10-fleet.conf").exists(), "a single host got the workers' fleet drop-in"
    assert not (rendered / "single" / "10-falcon-listen.conf").exists(), "a single host got listen_addresses"


def test_retention_job_reaches_a_remote_postgresql_only_on_a_fleet(rendered: Path) -> None:
    """The retention unit allows only localhost; a fleet's app host adds the data host, one host adds nothing."""
    assert not (rendered / "single" / "10-retention.conf").exists()
    assert f"IPAddressAllow={DATA}" in (rendered / "fleet" / "10-retention.conf").read_text().splitlines()


def test_fleet_load_balancer_spreads_over_both_app_hosts(rendered: Path) -> None:
    site = (rendered / "fleet" / "falcon-svc.conf").read_text()
    servers = [line.split()[1] for line in site.splitlines() if line.strip().startswith("server ") and ":80" in line]
    assert servers == [f"{APP1}:8001", f"{APP1}:8002", f"{APP2}:8001", f"{APP2}:8002"], servers
    assert "    proxy_next_upstream_tries 4;\n" in site, "tries must be more than one host's 2 units"
    assert "    proxy_read_timeout 5s;\n" in site and "    proxy_next_upstream_timeout 10s;\n" in site
    assert f"server 127.0.0.1:{PORTS[0]}" not in site


def test_fleet_prometheus_scrapes_every_host_with_a_host_label(rendered: Path) -> None:
    config = yaml.safe_load((rendered / "fleet" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    expected = FLEET_VARS["prometheus_job_targets"]
    for job, static_configs in expected.items():
        assert jobs[job] == static_configs, f"job {job}: {jobs[job]}"
    assert jobs["prometheus"] == [{"targets": ["127.0.0.1:9090"]}], "Prometheus scrapes itself on loopback"
    falcon = yaml.safe_load((rendered / "single" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert falcon["static_configs"] == [{"targets": ["127.0.0.1:8001", "127.0.0.1:8002"]}]


def test_fleet_app_host_binds_its_private_address_and_lets_monitoring_read_metrics(rendered: Path) -> None:
    dropin = (rendered / "fleet" / "10-fleet.conf").read_text().splitlines()
    assert "[Service]" in dropin
    assert f"Environment=BIND={APP1}:%i" in dropin
    # Its own address too: the role's readiness check comes from it.
    assert f"IPAddressAllow={APP1} {LB} {DATA}" in dropin
    env = _read_env_file(rendered / "fleet" / "falcon-svc.env")
    assert "BIND" not in env, "the env file would override the drop-in's BIND"
    assert env["METRICS_ALLOWED_NETWORKS"] == f"127.0.0.0/8,::1/128,{DATA}/32"
    settings = Settings.from_env(env)  # parses as a worker would
    assert settings.metrics_allowed_networks == f"127.0.0.0/8,::1/128,{DATA}/32"
    assert f"@{DATA}:6379/0" in env["REDIS_URL"] and f"@{DATA}:5432/" in env["DATABASE_URL"]
    assert "METRICS_ALLOWED_NETWORKS" not in _read_env_file(rendered / "single" / "falcon-svc.env")


def test_fleet_data_host_listens_privately_and_admits_the_app_hosts_with_scram(rendered: Path) -> None:
    listen = (rendered / "fleet" / "10-falcon-listen.conf").read_text()
    assert f"listen_addresses = 'localhost,{DATA}'\n" in listen
    hba = (rendered / "fleet" / "pg_hba.conf").read_text().splitlines()
    ours = [line.split() for line in hba if line.startswith("host") and "falcon_owner,falcon" in line]
    assert sorted(ours) == sorted(
        ["host", "falcon", "falcon_owner,falcon", network, "scram-sha-256"]
        for network in ("127.0.0.1/32", "::1/128", f"{APP1}/32", f"{APP2}/32")
    ), hba
    package_lines = [index for index, line in enumerate(hba) if line.startswith("host") and " all " in line]
    ours_lines = [index for index, line in enumerate(hba) if "falcon_owner,falcon" in line]
    assert max(ours_lines) < min(package_lines), "pg_hba.conf is read top down: ours must come before the package's"


def test_fleet_with_certificates_connects_over_verified_tls_only(rendered: Path) -> None:
    """Given the CA, the workers verify the data host's certificate and name; its pg_hba wants TLS from off-host."""
    env = _read_env_file(rendered / "fleet_tls" / "falcon-svc.env")
    settings = Settings.from_env(env)  # parses as a worker would
    redis_kwargs = redis.Redis.from_url(settings.redis_url).connection_pool.connection_kwargs
    assert settings.redis_url.startswith(f"rediss://falcon:{TEST_SECRETS['falcon_svc_redis_password']}@{DATA}:6379/0?")
    assert redis_kwargs["ssl_ca_certs"] == "/etc/ssl/falcon-svc/redis-ca.crt"
    assert redis_kwargs["ssl_check_hostname"] is True
    database = conninfo_to_dict(settings.database_url)
    assert (database["host"], database["sslmode"], database["sslrootcert"]) == (
        DATA,
        "verify-full",
        "/etc/ssl/falcon-svc/postgresql-ca.crt",
    )
    # Without the CA, plain TCP as before (the fleet render above).
    plain = _read_env_file(rendered / "fleet" / "falcon-svc.env")
    assert plain["REDIS_URL"].startswith("redis://") and "sslmode" not in plain["DATABASE_URL"]
    hba = [line.split() for line in (rendered / "fleet_tls" / "pg_hba.conf").read_text().splitlines()]
    ours = {line[3]: line[0] for line in hba if len(line) > 3 and line[2] == "falcon_owner,falcon"}
    assert ours == {"127.0.0.1/32": "host", "::1/128": "host", f"{APP1}/32": "hostssl", f"{APP2}/32": "hostssl"}


def test_a_second_render_changes_nothing(rendered: Path, tmp_path: Path) -> None:
    """The fleet tasks are idempotent: rerun over the same files, nothing changes (changed=0)."""
    inventory, play = rendered / "inventory.yml", rendered / "play.yml"
    result = _run(_tool("ansible-playbook"), "-i", str(inventory), str(play))
    recap = _recap(result.stdout)
    assert all(counts["changed"] == 0 and counts["failed"] == 0 for counts in recap.values()), result.stdout


# host -> (vars, whether the exporters' and node-exporter's preflights must refuse them)
LISTEN_CASES = {
    "loopback_defaults": ({}, False),
    "own_private_address": (
        {
            "falcon_private_address": DATA,
            "exporters_redis_listen_address": f"{DATA}:9121",
            "node_exporter_listen_address": f"{DATA}:9100",
        },
        False,
    ),
    "another_hosts_address": (
        {"falcon_private_address": DATA, "node_exporter_listen_address": f"{APP1}:9100"},
        True,
    ),
    "every_interface": ({"exporters_nginx_listen_address": "0.0.0.0:9113"}, True),
    "disabled_exporter_is_not_checked": (
        {"exporters_enabled": ["redis", "postgres"], "exporters_nginx_listen_address": "0.0.0.0:9113"},
        False,
    ),
    "unknown_exporter": ({"exporters_enabled": ["nginx", "mysql"]}, True),
    "no_redis_no_password_needed": ({"exporters_enabled": ["nginx"], "exporters_redis_password": ""}, False),
}


def _refused(tmp_path: Path, roles: tuple[str, ...], cases: dict[str, Any], common: dict[str, Any]) -> None:
    """Run the ``roles``' preflights on one local host per case: (its vars, whether it must be refused)."""
    group_vars = _role_vars(REPO_ROOT) | LOCAL | common
    hosts = {host: host_vars for host, (host_vars, _) in cases.items()}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts, "vars": group_vars}}))
    tasks = [
        {
            "name": f"Run the {role} preflight",
            "ansible.builtin.import_tasks": str(ROLES_DIR / role / "tasks/preflight.yml"),
        }
        for role in roles
    ]
    play = [{"name": "Probe the preflights", "hosts": "all", "gather_facts": False, "tasks": tasks}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    result = _run(_tool("ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"))
    recap = _recap(result.stdout)
    for host, (_, refused) in cases.items():
        assert bool(recap[host]["failed"]) == refused, f"{host}: expected refused={refused}\n{result.stdout}"


def test_exporters_listen_on_loopback_or_this_hosts_private_address_only(tmp_path: Path) -> None:
    _refused(tmp_path, ("exporters", "node_exporter"), LISTEN_CASES, {"exporters_redis_password": "r" * 20})


# host -> (vars, whether the falcon_svc, prometheus, postgresql and redis preflights must refuse them)
FLEET_INPUT_CASES = {
    "single_host_defaults": ({}, False),
    "fleet_values": ({key: value for key, value in FLEET_VARS.items() if not key.startswith("nginx_")}, False),
    "ipv6_bind_address": ({"falcon_svc_bind_address": "fd00::11"}, True),
    "peer_is_a_name": ({"falcon_svc_peer_addresses": ["data-01"]}, True),
    "metrics_network_without_prefix": ({"falcon_svc_metrics_networks": [DATA]}, True),
    "misspelt_job": ({"prometheus_job_targets": {"falcon_workers": [{"targets": [f"{APP1}:8001"]}]}}, True),
    "job_without_targets": ({"prometheus_job_targets": {"node": []}}, True),
    "listen_without_loopback": ({"postgresql_listen_addresses": DATA}, True),
    "hba_without_loopback": ({"postgresql_hba_networks": [f"{APP1}/32"]}, True),
    # The TLS inputs (files that exist here stand in for the certificates).
    "tls_complete": (
        {
            "postgresql_tls_cert_src": "/etc/hostname",
            "postgresql_tls_key_src": "/etc/hostname",
            "falcon_svc_db_tls_ca_src": "/etc/hostname",
        },
        False,
    ),
    "tls_certificate_without_key": ({"postgresql_tls_cert_src": "/etc/hostname"}, True),
    "tls_ca_missing": ({"falcon_svc_redis_tls_ca_src": "/nonexistent/ca.crt"}, True),
    "tls_ca_relative": ({"falcon_svc_db_tls_ca_src": "etc/hostname"}, True),
    "redis_tls_complete": (
        {
            "redis_tls_cert_src": "/etc/hostname",
            "redis_tls_key_src": "/etc/hostname",
            "redis_tls_ca_src": "/etc/hostname",
        },
        False,
    ),
    "redis_tls_without_ca": ({"redis_tls_cert_src": "/etc/hostname", "redis_tls_key_src": "/etc/hostname"}, True),
    "redis_tls_missing_key": (
        {
            "redis_tls_cert_src": "/etc/hostname",
            "redis_tls_key_src": "/nonexistent",
            "redis_tls_ca_src": "/etc/hostname",
        },
        True,
    ),
}


def test_fleet_inputs_are_checked_before_anything_changes(tmp_path: Path) -> None:
    common = {
        **TEST_SECRETS,
        "falcon_svc_source_dir": str(REPO_ROOT),
        "falcon_svc_api_keys_enabled": False,
        "prometheus_source_config": str(REPO_ROOT / "prometheus" / "prometheus.yml"),
        "prometheus_source_rules_dir": str(REPO_ROOT / "prometheus" / "rules"),
        "prometheus_alertmanager_notify": False,
        "postgresql_owner_password": TEST_SECRETS["falcon_svc_db_owner_password"],
        "postgresql_writer_password": TEST_SECRETS["falcon_svc_db_writer_password"],
        "postgresql_source_dir": str(REPO_ROOT),
        "redis_falcon_password": TEST_SECRETS["falcon_svc_redis_password"],
        "redis_exporter_password": "e" * 20,
    }
    _refused(tmp_path, ("falcon_svc", "prometheus", "postgresql", "redis"), FLEET_INPUT_CASES, common)
