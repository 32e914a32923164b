"""Who sees /metrics and the detail of /readyz and /v1/models: the host's clients, not the public."""

from __future__ import annotations

import dataclasses

import falcon.testing
import pytest

from falcon_svc.access import InternalAccess, parse_networks
from falcon_svc.app import create_app

RELAYED = {"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"}


@pytest.mark.parametrize(
    ("remote_addr", "headers", "allowed"),
    [
        ("127.0.0.1", {}, True),
        ("127.0.0.2", {}, True),
        ("::1", {}, True),
        ("::ffff:127.0.0.1", {}, True),
        ("203.0.113.7", {}, False),
        ("127.0.0.1", {"X-FORWARDED-FOR": "203.0.113.7"}, False),
        ("127.0.0.1", {"X-REAL-IP": "203.0.113.7"}, False),
        ("127.0.0.1", {"FORWARDED": "for=203.0.113.7"}, False),
        ("/run/falcon.sock", {}, False),
        ("", {}, False),
    ],
)
def test_internal_means_an_allowed_peer_that_no_proxy_relayed(remote_addr, headers, allowed):
    access = InternalAccess(parse_networks("127.0.0.0/8,::1/128"))
    assert access.allows(remote_addr, headers) is allowed, (remote_addr, headers)


@pytest.fixture
def scrape_network_client(settings, model, lifecycle):
    """An app whose only internal network is 10.0.0.0/8."""
    settings = dataclasses.replace(settings, metrics_allowed_networks="10.0.0.0/8")
    return falcon.testing.TestClient(create_app(settings, model, lifecycle=lifecycle, worker_id="test:1"))


def test_metrics_are_served_to_loopback_by_default(client):
    result = client.simulate_get("/metrics", remote_addr="127.0.0.1")
    assert result.status_code == 200 and "falcon_" in result.text, result.text[:200]


@pytest.mark.parametrize(("remote_addr", "headers"), [("198.51.100.9", {}), ("127.0.0.1", RELAYED)])
def test_metrics_are_a_json_404_to_anyone_else(client, remote_addr, headers):
    result = client.simulate_get("/metrics", remote_addr=remote_addr, headers=headers)
    assert result.status_code == 404, result.text[:200]
    assert result.json["error"]["code"] == "not_found", result.text


def test_metrics_follow_the_configured_networks(scrape_network_client):
    assert scrape_network_client.simulate_get("/metrics", remote_addr="10.1.2.3").status_code == 200
    assert scrape_network_client.simulate_get("/metrics", remote_addr="127.0.0.1").status_code == 404


def test_public_readyz_says_status_only(client):
    result = client.simulate_get("/readyz", remote_addr="127.0.0.1", headers=RELAYED)
    assert result.status_code == 200 and result.json == {"status": "ready"}, result.text


def test_internal_readyz_has_the_detail(client):
    body = client.simulate_get("/readyz", remote_addr="127.0.0.1").json
    assert {"model", "dependencies", "degraded", "warnings"} <= set(body), body


def test_public_readyz_keeps_its_status_code_when_draining(client, lifecycle):
    lifecycle.begin_drain()
    result = client.simulate_get("/readyz", remote_addr="198.51.100.9")
    assert result.status_code == 503 and result.json == {"status": "not_ready"}, result.text


def test_public_model_list_has_name_version_labels_and_roles_only(client, model):
    (entry,) = client.simulate_get("/v1/models", remote_addr="198.51.100.9").json["models"]
    expected = {"name": model.name, "version": model.version, "labels": list(model.labels)}
    assert entry == {**expected, "serving": True, "active": True}, entry


def test_internal_model_list_has_the_metadata(client):
    (entry,) = client.simulate_get("/v1/models", remote_addr="127.0.0.1").json["models"]
    assert "metadata" in entry and "kind" in entry, entry
