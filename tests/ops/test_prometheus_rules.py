"""Check the Prometheus side of falcon-svc: config, rules, rule unit tests, Alertmanager.

promtool (Debian package ``prometheus``) and amtool (``prometheus-alertmanager``) come
with `make test`; a missing one fails under CI and skips elsewhere (``tests/tools.py``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from metric_names import metric_series
from tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = REPO_ROOT / "prometheus"
ALERTS_FILE = PROM_DIR / "rules" / "falcon_alerts.yml"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))
RUNBOOK = REPO_ROOT / "docs" / "RUNBOOK.md"
RUNBOOK_BASE = "docs/RUNBOOK.md#"

ALERT_NAME = re.compile(r"^Falcon[A-Z][A-Za-z0-9]*$")
MINUTES = re.compile(r"^[1-9][0-9]*m$")
# A falcon_* metric name, not part of a recording rule name (level:metric:operations).
FALCON_METRIC = re.compile(r"(?<![\w:])(falcon_[a-zA-Z0-9_]+)(?![\w:])")
RECORDING_NAME = re.compile(r"(?<![\w])([a-z_]+:[a-zA-Z0-9_]+:[a-zA-Z0-9_]+)")
# Alerts about what every unit serves together rather than one unit, and the label
# their description names instead of the instance: a model version's label mix is
# summed over the units serving it (a unit's share of the traffic is too little).
SERVICE_WIDE_ALERTS = {"FalconPredictionDriftHigh": "version"}


def _promtool() -> str:
    return require_tool("promtool", "prometheus")


def _run(*args: str) -> None:
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"`{' '.join(args)}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in _load(path)["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_rule_files_and_tests_exist() -> None:
    assert ALERTS_FILE in RULE_FILES, f"{ALERTS_FILE} is missing"
    assert RULE_TEST_FILES, "no promtool rule unit tests under prometheus/tests/"


def test_promtool_check_config() -> None:
    _run(_promtool(), "check", "config", "prometheus/prometheus.yml")


def test_promtool_check_rules() -> None:
    _run(_promtool(), "check", "rules", *(str(path.relative_to(REPO_ROOT)) for path in RULE_FILES))


def test_promtool_rule_unit_tests() -> None:
    _run(_promtool(), "test", "rules", *(str(path.relative_to(REPO_ROOT)) for path in RULE_TEST_FILES))


def test_amtool_check_config() -> None:
    _run(require_tool("amtool", "prometheus-alertmanager"), "check-config", "prometheus/alertmanager.yml")


@pytest.mark.parametrize("alert", _alerts(), ids=lambda rule: f"{rule['alert']}-{rule['labels']['severity']}")
def test_alert_follows_conventions(alert: dict[str, Any]) -> None:
    name = alert["alert"]
    assert ALERT_NAME.match(name), f"{name}: alert names are Falcon<Subject><Condition>"
    duration = str(alert.get("for", ""))
    assert MINUTES.match(duration), f"{name}: `for:` must be a number of minutes, got {duration!r}"
    labels = alert.get("labels", {})
    assert labels.get("severity") in {"warning", "critical"}, f"{name}: severity must be warning or critical"
    annotations = alert.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key), f"{name}: missing the `{key}` annotation"
    assert "{{" not in annotations["summary"], f"{name}: the summary must be static (no template)"
    description = annotations["description"]
    subject = "{{ $labels." + SERVICE_WIDE_ALERTS.get(name, "instance") + " }}"
    assert subject in description, f"{name}: the description must name {subject}"
    if name in SERVICE_WIDE_ALERTS:
        assert "instance" not in alert["expr"], f"{name}: a service-wide alert must not select or group by instance"
    assert "$value" in description, f"{name}: the description must show the value ({{{{ $value }}}})"
    assert annotations["runbook_url"] == RUNBOOK_BASE + name.lower(), (
        f"{name}: runbook_url must be {RUNBOOK_BASE + name.lower()}, got {annotations['runbook_url']}"
    )


def test_alert_pairs_differ_by_severity() -> None:
    seen: dict[str, list[str]] = {}
    for alert in _alerts():
        seen.setdefault(alert["alert"], []).append(alert["labels"]["severity"])
    duplicated = {name: sevs for name, sevs in seen.items() if len(sevs) != len(set(sevs))}
    assert not duplicated, f"alerts sharing a name must differ in severity: {duplicated}"


def test_every_alert_is_in_the_threshold_table() -> None:
    header = ALERTS_FILE.read_text(encoding="utf-8").split("groups:", 1)[0]
    missing = sorted({alert["alert"] for alert in _alerts()} - set(re.findall(r"#\s+(Falcon\w+)", header)))
    assert not missing, f"alerts missing from the THRESHOLDS comment at the top of {ALERTS_FILE.name}: {missing}"


def test_every_runbook_anchor_is_a_runbook_heading() -> None:
    assert RUNBOOK.exists(), f"{RUNBOOK} is missing: every alert needs a runbook section there"
    headings = {
        _github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if re.match(r"^#{1,6} ", line)
    }
    missing = sorted(
        {
            alert["annotations"]["runbook_url"].split("#", 1)[1]
            for alert in _alerts()
            if alert["annotations"]["runbook_url"].split("#", 1)[1] not in headings
        }
    )
    assert not missing, f"runbook_url anchors with no heading in {RUNBOOK.relative_to(REPO_ROOT)}: {missing}"


def test_every_falcon_metric_in_the_rules_exists() -> None:
    known = metric_series()
    assert "falcon_http_requests_total" in known, f"metric discovery is broken: {sorted(known)}"
    unknown = {
        (path.name, name)
        for path in RULE_FILES
        for group in _load(path)["groups"]
        for rule in group["rules"]
        for name in FALCON_METRIC.findall(rule["expr"])
        if name not in known
    }
    assert not unknown, f"falcon_* metrics used in rules but not declared in falcon_svc/metrics.py: {sorted(unknown)}"


def test_every_recording_rule_used_is_defined() -> None:
    defined = {rule["record"] for rule in _rules() if "record" in rule}
    used = {name for rule in _rules() for name in RECORDING_NAME.findall(rule["expr"])}
    assert used, "no recording rule is used: the pattern is broken"
    assert used <= defined, f"recording rules used but never defined: {sorted(used - defined)}"
