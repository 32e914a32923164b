"""The Grafana dashboards and provisioning files are well formed (no servers needed).

That each query returns data is proven against a real Prometheus in
tests/integration/test_dashboards.py; this checks what Grafana itself needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA = REPO_ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
# Panel types that draw numbers and so need a unit (tables show labels).
NUMERIC_PANELS = {"timeseries", "stat", "gauge", "bargauge", "state-timeline"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_dashboards():
    assert {path.name for path in DASHBOARDS} >= {"falcon-service.json", "falcon-host.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_has_identity(path):
    dashboard = load(path)
    for key in ("uid", "title", "schemaVersion", "panels"):
        assert dashboard.get(key), f"{path.name}: missing {key}"
    assert dashboard["uid"] == path.stem, f"{path.name}: uid {dashboard['uid']!r} should match the file name"
    assert dashboard["schemaVersion"] >= 36, f"{path.name}: schemaVersion {dashboard['schemaVersion']} is too old"
    assert "id" not in dashboard or dashboard["id"] is None, f"{path.name}: a provisioned dashboard must not pin an id"


def test_dashboard_uids_are_unique():
    uids = [load(path)["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids)), f"duplicate dashboard uids: {uids}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_panel_ids_are_unique(path):
    ids = [panel.get("id") for panel in load(path)["panels"]]
    assert None not in ids, f"{path.name}: a panel has no id"
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids {sorted(ids)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_every_panel_is_complete(path):
    problems = []
    for panel in load(path)["panels"]:
        name = f"{path.name} panel {panel.get('id')} {panel.get('title')!r}"
        if not panel.get("title"):
            problems.append(f"{name}: no title")
        if not panel.get("description"):
            problems.append(f"{name}: no description")
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(key), int) for key in ("h", "w", "x", "y")):
            problems.append(f"{name}: gridPos {grid} lacks h/w/x/y")
        elif grid["x"] + grid["w"] > 24:
            problems.append(f"{name}: gridPos {grid} is wider than the 24-column grid")
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{name}: datasource {panel.get('datasource')} is not {DATASOURCE}")
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{name}: no targets")
        ref_ids = [target.get("refId") for target in targets]
        if len(ref_ids) != len(set(ref_ids)) or None in ref_ids:
            problems.append(f"{name}: refIds {ref_ids} missing or repeated")
        problems.extend(f"{name} target {target.get('refId')}: no expr" for target in targets if not target.get("expr"))
        problems.extend(
            f"{name} target {target.get('refId')}: datasource {target.get('datasource')}"
            for target in targets
            if target.get("datasource") != DATASOURCE
        )
        if panel.get("type") in NUMERIC_PANELS and not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{name}: no unit in fieldConfig.defaults")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_panels_do_not_overlap(path):
    taken: dict[tuple[int, int], str] = {}
    for panel in load(path)["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{path.name}: {panel['title']!r} overlaps {taken[x, y]!r} at {(x, y)}"
                taken[x, y] = panel["title"]


def test_circuit_breaker_panel_maps_states_to_words():
    panels = [panel for panel in load(GRAFANA / "dashboards" / "falcon-service.json")["panels"]
              if "falcon_circuit_breaker_state" in json.dumps(panel["targets"])]  # fmt: skip
    assert panels, "no panel shows falcon_circuit_breaker_state"
    for panel in panels:
        mapped = {}
        for mapping in panel["fieldConfig"]["defaults"].get("mappings", []):
            mapped.update({value: option["text"] for value, option in mapping.get("options", {}).items()})
        assert mapped == {"0": "closed", "1": "half-open", "2": "open"}, f"{panel['title']!r}: mappings {mapped}"


def test_datasource_provisioning():
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["uid"] == DATASOURCE["uid"] and source["type"] == DATASOURCE["type"], source
    assert source["url"] == "http://127.0.0.1:9090" and source["isDefault"] is True, source


def test_dashboard_provisioning():
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "falcon.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file" and provider["folder"] == "falcon-svc", provider
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/falcon", provider
