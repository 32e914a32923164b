"""The JSON error shapes, and the handlers that make every failure use one.

Every error body is ``{"error": {"code": ..., "message": ..., "field": ...}}``:
``code`` is a stable machine-readable token, ``message`` is for humans and
``field`` names the offending input (or is null).

Under ``/v2`` (the Open Inference Protocol) the body is OIP's instead:
``{"error": "<message>", "code": ..., "field": ...}``. OIP clients read
``error`` as the message string (tritonclient raises
``InferenceServerException(msg=body["error"])`` and ignores other keys), so
the stable ``code`` and the ``field`` ride along as extra keys, and
``falcon_input_errors_total`` counts by the same codes on every route.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon

from falcon_svc import metrics

logger = logging.getLogger(__name__)


class APIError(falcon.HTTPError):
    """An HTTP error carrying our stable ``code`` and the offending ``field``."""

    # NOTE: falcon's HTTPError has an optional int ``code`` (a support reference); ours is
    # the stable string token of the error shape, and to_dict() below is what writes it.
    code: str  # type: ignore[assignment]  # a string where falcon's base class has int | None

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


OIP_PREFIX = "/v2"


def is_oip_path(path: str) -> bool:
    """Tell whether ``path`` is under the Open Inference Protocol's ``/v2`` (not ``/v2x``)."""
    return path.startswith(OIP_PREFIX) and (len(path) == len(OIP_PREFIX) or path[len(OIP_PREFIX)] == "/")


def serialize_error(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    """Write any ``HTTPError`` as JSON, whatever the client accepts: OIP's shape under /v2, else ours."""
    status = exception.status_code
    if isinstance(exception, APIError):
        code, message, field = exception.code, exception.description, exception.field
    else:
        code = _FALCON_CODES.get(status, f"http_{status}")
        message = exception.description or exception.title or falcon.code_to_http_status(status)
        field = None
    if 400 <= status < 500:
        metrics.INPUT_ERRORS.labels(code).inc()
    # The access line says why (falcon_svc/middleware/context.py): its ``code``,
    # ``field`` and the journal's ERROR_CODE come from here.
    req.context.error_code = code
    req.context.error_field = field
    if is_oip_path(req.path):
        resp.media = {"error": message, "code": code, "field": field}
    else:
        resp.media = {"error": {"code": code, "message": message, "field": field}}
    resp.content_type = falcon.MEDIA_JSON


def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]) -> None:
    """Turn a bug into a logged 500 in the JSON shape rather than an HTML page."""
    if isinstance(ex, falcon.HTTPError):
        raise ex
    # NOTE: the type and traceback go to the log (under systemd: priority err, with
    # EXCEPTION_TYPE, TRACEBACK and REQUEST_ID fields), never to the client.
    logger.exception(
        "unhandled error on %s %s",
        req.method,
        req.path,
        extra={"request_id": req.context.get("request_id"), "exception_type": type(ex).__name__},
    )
    raise APIError(falcon.HTTP_500, "internal_error", "The server failed to handle this request.") from ex


def not_found_sink(req: falcon.Request, resp: falcon.Response, **kwargs: Any) -> None:
    """Answer unknown routes with a JSON 404 naming the path."""
    raise APIError(falcon.HTTP_404, "not_found", f"No route matches {req.path}.")
