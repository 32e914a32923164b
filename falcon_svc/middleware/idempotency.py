"""The idempotency middleware: applies ``IdempotencyStore`` to POST requests with ``X-Idempotency-Key``.

What a replay, a conflict and a mismatch answer is described in ``falcon_svc.idempotency``.
A 2xx response over ``IDEMPOTENCY_MAX_RESPONSE_BYTES`` is answered but not
stored: the key is released and ``Idempotency-Status: not-stored`` says so.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import falcon

from falcon_svc.errors import APIError
from falcon_svc.idempotency import (
    HEADER,
    REPLAYED_HEADER,
    REPLAYED_RESPONSE_HEADERS,
    STATUS_HEADER,
    Claim,
    IdempotencyStore,
    Outcome,
    fingerprint,
    scoped_key,
    validate_key,
)
from falcon_svc.settings import Settings
from falcon_svc.tensors import HEADER_LENGTH_HEADER
from falcon_svc.validation import read_body

logger = logging.getLogger(__name__)
NOT_STORED = "not-stored"


def _refusal(outcome: Outcome) -> APIError:
    """Return the error for a key taken by another request (422) or by one in flight (409).

    A new error per request: an exception instance carries its traceback. The
    codes are literals so tests/unit/test_openapi.py can check them against the spec.
    """
    if outcome is Outcome.MISMATCH:
        message = f"This {HEADER} was used with a different request; use a new key for a new request."
        return APIError(falcon.HTTP_422, "idempotency_key_mismatch", message, field=HEADER)
    message = f"A request with this {HEADER} is still being processed; retry shortly."
    return APIError(falcon.HTTP_409, "idempotency_key_in_flight", message, field=HEADER, headers={"Retry-After": "1"})


class IdempotencyMiddleware:
    """Apply ``IdempotencyStore`` to POST requests that carry the header."""

    def __init__(self, store: IdempotencyStore, settings: Settings) -> None:
        self._store = store
        self._max_body = settings.max_body_bytes
        self._max_response = settings.idempotency_max_response_bytes

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        key = req.get_header(HEADER)
        if key is None or req.method != "POST" or resource is None:
            return
        key = validate_key(key)
        # NOTE: the body is read here, once, and handed to the resource through
        # req.context.raw_body; an oversized one is left for the resource's 413.
        raw = read_body(req, self._max_body)
        req.context.raw_body = raw
        if len(raw) > self._max_body:
            return
        # NOTE: ``client_id`` is the client scope: the API key's id, set by APIKeyAuth
        # (falcon_svc/auth), which runs first; with API keys off every client shares "".
        client_scope = req.context.get("client_id") or ""
        request_fingerprint = fingerprint(
            req.method, req.path, req.content_type, raw, header_length=req.get_header(HEADER_LENGTH_HEADER)
        )
        # NOTE: nginx's request id, the same on each unit it tries: a retry of this
        # request after a unit died holding the claim takes the claim over.
        attempt_of = req.context.get("proxy_log_id") or ""
        claim = self._store.begin(scoped_key(req.path, client_scope, key), request_fingerprint, attempt_of)
        if claim.outcome is Outcome.FIRST:
            req.context.idempotency_claim = claim
        elif claim.outcome is Outcome.UNAVAILABLE:
            resp.set_header(STATUS_HEADER, "unavailable")
        elif claim.outcome is Outcome.REPLAYED:
            self._replay(req, resp, claim.stored or {})
        else:
            raise _refusal(claim.outcome)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        claim: Claim | None = getattr(req.context, "idempotency_claim", None)
        if claim is None:
            return
        try:
            if req_succeeded and 200 <= resp.status_code < 300:
                body = resp.render_body() or b""
                if len(body) > self._max_response:
                    # NOTE: not stored, so that no request can fill Redis: a large
                    # reply stored under many keys would evict the cache and other
                    # clients' keys (Redis runs as an LRU). A retry computes again.
                    resp.set_header(STATUS_HEADER, NOT_STORED)
                    logger.info(
                        "idempotent response of %d bytes not stored (IDEMPOTENCY_MAX_RESPONSE_BYTES=%d)",
                        len(body),
                        self._max_response,
                        extra={"idempotency_key": claim.key},
                    )
                    self._store.release(claim)
                    return
                headers = {
                    "X-Request-ID": req.context.request_id,
                    "Content-Type": resp.content_type or falcon.MEDIA_JSON,
                }
                for name in REPLAYED_RESPONSE_HEADERS:
                    value = resp.get_header(name)
                    if value is not None:
                        headers[name] = value
                self._store.complete(claim, resp.status_code, body, headers)
                return
        except Exception:
            # A response that cannot be stored must not leave the key claimed.
            self._store.release(claim)
            raise
        self._store.release(claim)

    @staticmethod
    def _replay(req: falcon.Request, resp: falcon.Response, stored: dict[str, Any]) -> None:
        headers = stored["headers"]
        resp.status = stored["status"]
        if "body_base64" in stored:
            resp.data = base64.b64decode(stored["body_base64"])
        else:
            resp.data = stored["body"].encode("utf-8")
        # Records stored before 2026-12 have no Content-Type: they were all JSON.
        resp.content_type = headers.get("Content-Type", falcon.MEDIA_JSON)
        for name in REPLAYED_RESPONSE_HEADERS:
            if name in headers:
                resp.set_header(name, headers[name])
        resp.set_header(REPLAYED_HEADER, "true")
        # The replay answers with the original request id; this request keeps its
        # own id in the logs.
        req.context.response_request_id = headers.get("X-Request-ID")
        req.context.idempotent_replay = True
        resp.complete = True
