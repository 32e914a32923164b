"""The app conforms to falcon_svc/openapi.json (schemathesis), and bad input never gets a 5xx (hypothesis).

Also: every route and every error code the service (or nginx, or the HTTP server)
can answer is in the spec and in README.md's error table, and the pages the spec
is shown on (/docs, the demo page at /) are served as the spec says.
"""

from __future__ import annotations

import ast
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import falcon
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

import falcon_svc
from falcon_svc.errors import is_oip_path
from falcon_svc.resources import ui
from falcon_svc.resources.openapi import SPEC_FILE, load_spec_bytes

SPEC = json.loads(load_spec_bytes())
JSON = {"Content-Type": "application/json"}
PACKAGE_DIR = Path(falcon_svc.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent

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


def _check_reply(result, path: str = "/infer") -> None:
    """A reply below 500, and an error in the shape of its route (OIP's under /v2, ours elsewhere)."""
    assert result.status_code < 500, f"{result.status_code}: {result.text}"
    body = result.json
    if result.status_code >= 400:
        if is_oip_path(path):
            assert set(body) == {"error", "code", "field"} and isinstance(body["error"], str), body
        else:
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body


@pytest.mark.parametrize("path", ["/infer", "/infer/batch", "/v2/models/sentiment/infer"])
@settings(max_examples=150, suppress_health_check=list(HealthCheck), deadline=None)
@given(body=json_values)
def test_any_json_body_never_yields_5xx(client, path, body):
    _check_reply(client.simulate_post(path, body=json.dumps(body), headers=JSON), path)


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


# --- Error codes: code, spec and README agree -------------------------------------

NGINX_TEMPLATE = REPO_ROOT / "nginx" / "falcon-svc.conf.j2"
MEINHELD_PATCHES = REPO_ROOT / "scripts" / "meinheld"
README = REPO_ROOT / "README.md"


def _string(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _called_name(func: ast.AST) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def codes_in_python() -> tuple[set[str], list[str]]:
    """Return the error codes written in falcon_svc/, and the APIError calls whose code is not a literal.

    Codes are found in ``APIError(status, "code", ...)`` calls, in dicts assigned
    to names ending in CODES (``_FALCON_CODES``, gunicorn's ``_CODES``), and in
    dict literals with a ``"code"`` key.
    """
    codes: set[str] = set()
    not_literal: list[str] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _called_name(node.func) == "APIError":
                argument = node.args[1] if len(node.args) > 1 else None
                argument = argument or next((k.value for k in node.keywords if k.arg == "code"), None)
                if _string(argument) is None:
                    not_literal.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
                else:
                    codes.add(_string(argument))
            elif isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id.endswith("CODES") for t in targets):
                    codes |= {_string(v) for v in node.value.values if _string(v)}
            if isinstance(node, ast.Dict):
                codes |= {
                    _string(v)
                    for k, v in zip(node.keys, node.values, strict=True)
                    if _string(k) == "code" and _string(v)
                }
    return codes, not_literal


def codes_outside_python() -> set[str]:
    """Return the codes nginx's template and our meinheld patch answer with."""
    codes = set(re.findall(r'"code": "(\w+)"', NGINX_TEMPLATE.read_text()))
    for patch in MEINHELD_PATCHES.glob("*.patch"):
        added = "\n".join(line for line in patch.read_text().splitlines() if line.startswith("+"))
        codes |= set(re.findall(r'\bcode = "(\w+)";', added))
    return codes


def spec_error_codes() -> list[str]:
    (enum,) = [choice["enum"] for choice in SPEC["components"]["schemas"]["ErrorCode"]["anyOf"] if "enum" in choice]
    return enum


def readme_error_codes() -> set[str]:
    """Return the codes in README.md's error table (`| status | code | when |`)."""
    lines = README.read_text().splitlines()
    header = next((i for i, line in enumerate(lines) if re.match(r"\|\s*status\s*\|\s*code\s*\|", line)), None)
    assert header is not None, "README.md has no error table with a '| status | code | when |' header"
    codes: set[str] = set()
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        codes |= set(re.findall(r"`(\w+)`", line.split("|")[2]))
    return codes


def test_the_code_scan_finds_codes_in_each_place():
    """Guard the scanner itself: each source it reads still yields what it is known to hold."""
    python_codes, _ = codes_in_python()
    assert {
        "invalid_input",
        "idempotency_key_in_flight",
        "method_not_allowed",
        "header_fields_too_large",
    } <= python_codes
    assert {"too_many_requests", "bad_gateway", "length_required"} <= codes_outside_python()


def test_every_apierror_has_a_literal_code():
    _, not_literal = codes_in_python()
    assert not not_literal, f"APIError with a computed code cannot be checked against the spec: {not_literal}"


def test_every_error_code_is_in_the_spec_and_none_is_stale():
    python_codes, _ = codes_in_python()
    raised = python_codes | codes_outside_python()
    documented = spec_error_codes()
    assert len(documented) == len(set(documented)), f"ErrorCode lists a code twice: {documented}"
    missing, stale = sorted(raised - set(documented)), sorted(set(documented) - raised)
    assert not missing, f"codes missing from ErrorCode in openapi.json: {missing}"
    assert not stale, f"ErrorCode lists codes nothing answers: {stale}"
    table = SPEC["components"]["schemas"]["ErrorCode"]["description"]
    untold = [code for code in documented if f"`{code}`" not in table]
    assert not untold, f"ErrorCode's description table does not explain {untold}"


def test_every_error_code_is_in_the_readme_error_table():
    missing = sorted(set(spec_error_codes()) - readme_error_codes())
    assert not missing, f"README.md's error table lacks {missing}"


# --- /docs and the demo page ------------------------------------------------------


def test_documented_files_are_the_served_files():
    for path, served in (("/static/{asset}", ui.OWN_ASSETS), ("/docs/{asset}", ui.SWAGGER_ASSETS)):
        (parameter,) = SPEC["paths"][path]["get"]["parameters"]
        assert parameter["schema"]["enum"] == list(served), f"{path}: the spec and ui.py list different files"


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_pages_are_html_under_the_content_security_policy(client, path):
    result = client.simulate_get(path)
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == "text/html; charset=utf-8", result.headers
    assert result.headers["content-security-policy"] == ui.CONTENT_SECURITY_POLICY, result.headers
    assert "script-src 'self';" in ui.CONTENT_SECURITY_POLICY and "unsafe" not in ui.CONTENT_SECURITY_POLICY
    assert result.headers["cache-control"] == "no-cache" and result.headers["etag"], result.headers
    head = client.simulate_head(path)
    assert head.status_code == 200 and head.content == b"", head.status


@pytest.mark.parametrize(
    ("path", "cache_control"),
    [(f"/static/{name}", ui.REVALIDATE) for name in ui.OWN_ASSETS]
    + [(f"/docs/{name}", ui.PINNED) for name in ui.SWAGGER_ASSETS],
)
def test_assets_are_served_with_their_cache_policy_and_revalidate(client, path, cache_control):
    result = client.simulate_get(path)
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == ui.CONTENT_TYPES[Path(path).suffix], result.headers
    assert result.headers["cache-control"] == cache_control, result.headers
    assert result.headers["x-content-type-options"] == "nosniff", result.headers
    again = client.simulate_get(path, headers={"If-None-Match": result.headers["etag"]})
    assert again.status_code == 304 and again.content == b"", f"{again.status}: a current ETag must get a bodiless 304"


@pytest.mark.parametrize(
    "path",
    ["/static/nope.js", "/static/index.html", "/docs/index.html", "/docs/swagger-ui.js.map", "/static/..%2fapp.py"],
)
def test_unknown_assets_get_the_json_404(client, path):
    result = client.simulate_get(path)
    assert result.status_code == 404, result.text
    assert result.json["error"]["code"] == "not_found", result.json


def test_docs_without_swagger_ui_is_a_json_503(monkeypatch):
    """A host without swagger-ui-bundle still serves the API; /docs says what to install."""
    monkeypatch.setattr(ui, "swagger_ui_dir", lambda: None)
    app = falcon.App()
    app.set_error_serializer(falcon_svc.errors.serialize_error)
    app.add_route("/docs", ui.DocsPageResource())
    app.add_route("/docs/{asset}", ui.SwaggerAssetResource())
    client = falcon.testing.TestClient(app)
    for path in ("/docs", "/docs/swagger-ui-bundle.js"):
        result = client.simulate_get(path)
        assert result.status_code == 503, result.text
        assert result.json["error"]["code"] == "unavailable" and "swagger-ui-bundle" in result.json["error"]["message"]


class _PageScan(HTMLParser):
    """Collect what a strict Content-Security-Policy would refuse, and every URL a page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.urls: list[str] = []
        self._in_inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.inline += [f"<{tag} {name}=...>" for name in names if name.startswith("on")]
        if tag == "script" and not names.get("src"):
            self.inline.append("<script> without src")
        if tag == "style":
            self.inline.append("<style>")
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.parametrize("page", ["index.html", "docs.html"])
def test_pages_have_no_inline_script_and_load_only_served_files(client, page):
    scan = _PageScan()
    scan.feed((ui.web_dir() / page).read_text())
    assert not scan.inline, f"{page}: inline code a strict CSP would block: {scan.inline}"
    assert scan.urls, f"{page} loads nothing?"
    for url in scan.urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        result = client.simulate_get(url)
        assert result.status_code == 200, f"{page} links {url}, which answers {result.status_code}"


@pytest.mark.parametrize("name", [*ui.OWN_ASSETS, "index.html", "docs.html"])
def test_web_files_reach_no_other_host(name):
    # An XML namespace names a vocabulary; nothing is fetched from it.
    text = re.sub(r'xmlns(:\w+)?="[^"]*"', "", (ui.web_dir() / name).read_text())
    found = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text)
    assert not found, f"{name} refers to other hosts {found}: the page must work with this service alone"
