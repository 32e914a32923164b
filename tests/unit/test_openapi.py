"""The app conforms to falcon_svc/openapi.json (schemathesis), and bad input never gets a 5xx (hypothesis)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import falcon
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

import falcon_svc
from falcon_svc.resources.openapi import SPEC_FILE, load_spec_bytes

SPEC = json.loads(load_spec_bytes())
JSON = {"Content-Type": "application/json"}

# NOTE: loaded from the committed file (not the served copy) and sent to the app
# fixture per call: schemathesis's from_fixture breaks on pytest 9.
schema = schemathesis.openapi.from_path(Path(falcon_svc.__file__).parent / SPEC_FILE)


@schema.parametrize()
@settings(max_examples=40, suppress_health_check=list(HealthCheck), deadline=None)
def test_api_conforms_to_its_openapi_spec(case, app: falcon.App):
    """Every generated request (valid and not) gets a documented status and a body matching its schema.

    NOTE: "schema-valid data is accepted" is left out on purpose: a text must be
    non-blank and at most 5,000 characters *after NFKC normalisation*, which JSON
    Schema cannot say (NFKC can lengthen a text, and Unicode's whitespace is wider
    than ECMA's \\S); such texts get the documented 422 instead.
    """
    case.call_and_validate(app=app, excluded_checks=[positive_data_acceptance])


def test_every_route_is_documented(app: falcon.App):
    """The spec and the router list the same paths, so neither can drift."""
    routed = set()

    def walk(nodes):
        for node in nodes:
            if node.resource is not None:
                routed.add(re.sub(r"\{(\w+)\}", r"{\1}", node.uri_template))
            walk(node.children)

    walk(app._router._roots)
    documented = set(SPEC["paths"])
    assert routed == documented, f"undocumented: {routed - documented}, stale: {documented - routed}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def _check_reply(result) -> None:
    assert result.status_code < 500, f"{result.status_code}: {result.text}"
    body = result.json
    if result.status_code >= 400:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body


@pytest.mark.parametrize("path", ["/infer", "/infer/batch", "/v2/models/sentiment/infer"])
@settings(max_examples=150, suppress_health_check=list(HealthCheck), deadline=None)
@given(body=json_values)
def test_any_json_body_never_yields_5xx(client, path, body):
    _check_reply(client.simulate_post(path, body=json.dumps(body), headers=JSON))


@settings(max_examples=150, suppress_health_check=list(HealthCheck), deadline=None)
@given(raw=st.binary(max_size=300))
def test_any_bytes_never_yield_5xx(client, raw):
    _check_reply(client.simulate_post("/infer", body=raw, headers=JSON))


@settings(max_examples=200, suppress_health_check=list(HealthCheck), deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_is_classified_or_rejected_with_422(client, text):
    result = client.simulate_post("/infer", body=json.dumps({"text": text}), headers=JSON)
    _check_reply(result)
    assert result.status_code in (200, 422), result.text
    if result.status_code == 200:
        assert result.json["label"] in ("negative", "neutral", "positive")
