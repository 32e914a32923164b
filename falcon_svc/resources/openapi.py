"""``GET /openapi.json``: the committed OpenAPI 3 description of this API."""

from __future__ import annotations

from importlib import resources

import falcon

SPEC_FILE = "openapi.json"


def load_spec_bytes() -> bytes:
    """Return the spec shipped inside the package."""
    return resources.files("falcon_svc").joinpath(SPEC_FILE).read_bytes()


class OpenAPIResource:
    """Serve the spec as it is committed (read once, at start-up)."""

    def __init__(self) -> None:
        self._spec = load_spec_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._spec
        resp.content_type = falcon.MEDIA_JSON
