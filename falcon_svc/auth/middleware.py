"""Require ``Authorization: Bearer <API key>`` on the routes that run the model.

Protected: ``/infer``, ``/infer/batch`` and the OIP ``/v2/.../infer`` routes,
the ones that spend CPU and write request-log rows. Open: the probes
(``/healthz``, ``/readyz``, ``/v2/health/*``), model and server metadata (the
public API contract; their details are restricted by network in
``falcon_svc.access``), ``/metrics`` (network-restricted), the OpenAPI document,
the demo page and the docs: a load balancer, Prometheus and a reader of the docs
hold no key.

A missing key, or a key with another scheme, is 401 with ``WWW-Authenticate:
Bearer realm="falcon-svc"``; a key that is not ours adds ``error="invalid_token"``
(RFC 6750, 3.1). An accepted key's id (never the key) goes on
``req.context.client_key_id`` for the logs, on ``req.context.client_id`` for the
idempotency scope, and in the ``X-Client-Key-Id`` response header, which nginx
logs as ``client_key_id``. NOTE: nginx's per-client rate limit keys on the bearer
token itself (``nginx/falcon-svc.conf.j2``): it is applied before the request is
proxied, so a response header cannot decide it.
"""

from __future__ import annotations

from typing import Any

import falcon

from falcon_svc.auth.keys import KeyStore
from falcon_svc.errors import APIError

KEY_ID_HEADER = "X-Client-Key-Id"
REALM = "falcon-svc"
# Route templates (falcon's req.uri_template) that need a key.
PROTECTED_ROUTES = frozenset(
    {"/infer", "/infer/batch", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"}
)


def _unauthorized(key_sent: bool) -> APIError:
    """Return the 401 for a request without a usable key (a new error each time: it carries a traceback)."""
    if key_sent:
        challenge = f'Bearer realm="{REALM}", error="invalid_token"'
        message = "The API key is not valid (unknown, revoked or malformed)."
    else:
        challenge = f'Bearer realm="{REALM}"'
        message = "This route needs an API key: send 'Authorization: Bearer <key>'."
    return APIError(falcon.HTTP_401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def bearer_token(header: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header, else None (the scheme is case-insensitive)."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class APIKeyAuth:
    """Falcon middleware: refuse protected routes without a valid API key, and name the client."""

    def __init__(self, keys: KeyStore, protected_routes: frozenset[str] = PROTECTED_ROUTES) -> None:
        self._keys = keys
        self._protected = protected_routes

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        if req.uri_template not in self._protected:
            return
        token = bearer_token(req.get_header("Authorization"))
        if token is None:
            raise _unauthorized(key_sent=False)
        key_id = self._keys.authenticate(token)
        if key_id is None:
            raise _unauthorized(key_sent=True)
        req.context.client_key_id = key_id
        req.context.client_id = key_id
        resp.set_header(KEY_ID_HEADER, key_id)
