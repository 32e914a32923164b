"""The one JSON error shape, and the handlers that make every failure use it.

Every error body is ``{"error": {"code": ..., "message": ..., "field": ...}}``:
``code`` is a stable machine-readable token, ``message`` is for humans and
``field`` names the offending input (or is null).
"""

from __future__ import annotations

import logging
from typing import Any

import falcon

from falcon_svc import metrics

logger = logging.getLogger(__name__)


class APIError(falcon.HTTPError):
    """An HTTP error carrying our stable ``code`` and the offending ``field``."""

    def __init__(
        self,
        status: str | int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, title=code, description=message, headers=headers)
        self.code = code
        self.field = field

    def to_dict(self, obj_type: type = dict) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.description, "field": self.field}}


def invalid_input(message: str, field: str | None) -> APIError:
    """Build a 422: the JSON parsed, but a value breaks the contract."""
    return APIError(falcon.HTTP_422, "invalid_input", message, field=field)


# Falcon raises its own errors for routing and a few header checks; map each to
# a stable code so clients never have to parse a title.
_FALCON_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    400: "bad_request",
    429: "too_many_requests",
    503: "unavailable",
}


def serialize_error(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    """Write any ``HTTPError`` in the one JSON shape, whatever the client accepts."""
    status = exception.status_code
    if isinstance(exception, APIError):
        code = exception.code
        body = exception.to_dict()
    else:
        code = _FALCON_CODES.get(status, f"http_{status}")
        message = exception.description or exception.title or falcon.code_to_http_status(status)
        body = {"error": {"code": code, "message": message, "field": None}}
    if 400 <= status < 500:
        metrics.INPUT_ERRORS.labels(code).inc()
    resp.media = body
    resp.content_type = falcon.MEDIA_JSON


def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]) -> None:
    """Turn a bug into a logged 500 in the JSON shape rather than an HTML page."""
    if isinstance(ex, falcon.HTTPError):
        raise ex
    logger.exception("unhandled error on %s %s", req.method, req.path)
    raise APIError(falcon.HTTP_500, "internal_error", "The server failed to handle this request.") from ex


def not_found_sink(req: falcon.Request, resp: falcon.Response, **kwargs: Any) -> None:
    """Answer unknown routes with a JSON 404 naming the path."""
    raise APIError(falcon.HTTP_404, "not_found", f"No route matches {req.path}.")
