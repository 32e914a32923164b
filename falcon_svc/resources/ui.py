"""The demo page at ``/``, Swagger UI at ``/docs``, and the files they load.

Our own files are plain HTML, CSS and JavaScript in ``falcon_svc/web/`` (no
build step, no CDN, no inline script), served from ``/`` (index.html), ``/docs``
(docs.html) and ``/static/{asset}``. Swagger UI's files come from the pinned
``swagger-ui-bundle`` package under ``/docs/{asset}``. Only listed files are
served (no path ever reaches the file system), each read once at start-up; an
unknown name is the service's JSON 404.

On a deployed host nginx serves ``/`` and ``/static/`` itself, from the same
files in the deployed package directory, with the same headers
(nginx/falcon-svc.conf.j2); the app serves them under ``make run``.

Without swagger-ui-bundle the service still starts: ``/docs`` and its files
answer a JSON 503 saying what to install, and a warning is logged once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import falcon

from falcon_svc.errors import APIError

logger = logging.getLogger(__name__)

WEB_PACKAGE_DIR = "web"
OWN_ASSETS = ("style.css", "app.js", "docs.css", "docs.js", "favicon.svg")
SWAGGER_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js")
_SWAGGER_MISSING = "Swagger UI is not installed on this host: pip install --no-deps swagger-ui-bundle==1.1.0."

# NOTE: our files change with every deploy under the same names, so browsers
# revalidate them (a cheap 304 on the ETag); Swagger UI's are pinned, so they
# may be reused for a day without asking.
REVALIDATE = "no-cache"
PINNED = "public, max-age=86400"

# The pages load scripts, styles and data from this origin only, with no inline
# script or style element (Swagger UI styles through the DOM, which the policy
# allows, and draws icons from data: URIs). tests/integration/test_demo_page.py
# checks Chromium reports no violation; nginx/falcon-svc.conf.j2 sends the same.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One file as it is served: its bytes and the headers that go with them."""

    body: bytes
    content_type: str
    etag: str
    cache_control: str


def load_asset(path: Path, cache_control: str) -> Asset:
    """Read ``path`` and describe it for serving (content type from the suffix, ETag from the bytes)."""
    body = path.read_bytes()
    return Asset(
        body=body,
        content_type=CONTENT_TYPES[path.suffix],
        etag=hashlib.sha256(body).hexdigest()[:32],
        cache_control=cache_control,
    )


def web_dir() -> Path:
    """Return the folder of our own web files inside the installed package."""
    return Path(str(resources.files("falcon_svc").joinpath(WEB_PACKAGE_DIR)))


def swagger_ui_dir() -> Path | None:
    """Return the folder of Swagger UI's static files, or None when the package is missing."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(str(swagger_ui_bundle.swagger_ui_path))


def serve(req: falcon.Request, resp: falcon.Response, asset: Asset) -> None:
    """Answer with ``asset``, or a bodiless 304 when the client's copy is current."""
    resp.etag = asset.etag
    resp.cache_control = [asset.cache_control]
    resp.set_header("X-Content-Type-Options", "nosniff")
    if any(tag == asset.etag for tag in req.if_none_match or ()):
        resp.status = falcon.HTTP_304
        return
    resp.content_type = asset.content_type
    resp.data = asset.body


class _Page:
    """An HTML page under the Content-Security-Policy (GET and HEAD)."""

    _asset: Asset | None = None
    _missing = ""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._asset is None:
            raise APIError(falcon.HTTP_503, "unavailable", self._missing)
        resp.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        resp.set_header("Referrer-Policy", "no-referrer")
        serve(req, resp, self._asset)

    on_head = on_get


class _Assets:
    """A fixed set of files under ``_prefix``; any other name is a JSON 404 (GET and HEAD)."""

    _prefix = ""
    _assets: dict[str, Asset] = {}
    _missing = ""

    def on_get(self, req: falcon.Request, resp: falcon.Response, asset: str) -> None:
        if self._missing:
            raise APIError(falcon.HTTP_503, "unavailable", self._missing)
        found = self._assets.get(asset)
        if found is None:
            raise APIError(falcon.HTTP_404, "not_found", f"No file {asset!r} under {self._prefix}/.")
        serve(req, resp, found)

    on_head = on_get


class DemoPageResource(_Page):
    """``GET /``: the demo page (index.html)."""

    def __init__(self) -> None:
        self._asset = load_asset(web_dir() / "index.html", REVALIDATE)


class StaticAssetResource(_Assets):
    """``GET /static/{asset}``: the demo page's and /docs' own CSS, JavaScript and icon."""

    def __init__(self) -> None:
        self._prefix = "/static"
        self._assets = {name: load_asset(web_dir() / name, REVALIDATE) for name in OWN_ASSETS}


class DocsPageResource(_Page):
    """``GET /docs``: Swagger UI on /openapi.json (docs.html), or a 503 without swagger-ui-bundle."""

    def __init__(self) -> None:
        if swagger_ui_dir() is None:
            self._missing = _SWAGGER_MISSING
            logger.warning("/docs unavailable: %s", _SWAGGER_MISSING)
        else:
            self._asset = load_asset(web_dir() / "docs.html", REVALIDATE)


class SwaggerAssetResource(_Assets):
    """``GET /docs/{asset}``: Swagger UI's own files, from the pinned package."""

    def __init__(self) -> None:
        self._prefix = "/docs"
        directory = swagger_ui_dir()
        if directory is None:
            self._missing = _SWAGGER_MISSING
        else:
            self._assets = {name: load_asset(directory / name, PINNED) for name in SWAGGER_ASSETS}
