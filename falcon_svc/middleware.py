"""Give every request an id, time it, count it and log it as one JSON line."""

from __future__ import annotations

import logging
import os
import re
import time

import falcon

from falcon_svc import metrics
from falcon_svc.logs import ACCESS_LOGGER

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is honoured only if it is short and plain, so it is safe in logs,
# headers and the database (no spaces, quotes or control characters).
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
UNMATCHED_ROUTE = "unmatched"

access_logger = logging.getLogger(ACCESS_LOGGER)


def new_request_id() -> str:
    """Return a fresh random id (128 bits, hex)."""
    return os.urandom(16).hex()


def request_id_for(header_value: str | None) -> str:
    """Return the client's id if it is sane, else a fresh one."""
    if header_value and _SANE_REQUEST_ID.fullmatch(header_value):
        return header_value
    return new_request_id()


def elapsed_ms(req: falcon.Request) -> float:
    """Return the milliseconds since the request started, rounded to microseconds."""
    return round((time.perf_counter() - req.context.started) * 1000.0, 3)


class RequestContext:
    """Falcon middleware: request id, timing, metrics and the access log line."""

    def __init__(self, worker_id: str, access_log: bool = True) -> None:
        self._worker_id = worker_id
        self._access_log = access_log

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        req.context.request_id = request_id_for(req.get_header(REQUEST_ID_HEADER))
        metrics.IN_FLIGHT.inc()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        request_id = req.context.request_id
        resp.set_header(REQUEST_ID_HEADER, request_id)
        seconds = time.perf_counter() - req.context.started
        route = req.uri_template or UNMATCHED_ROUTE
        status = str(resp.status_code)
        metrics.IN_FLIGHT.dec()
        metrics.REQUESTS.labels(route, req.method, status).inc()
        metrics.REQUEST_LATENCY.labels(route).observe(seconds)
        if self._access_log:
            access_logger.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": req.method,
                    "route": route,
                    "path": req.path,
                    "status": resp.status_code,
                    "latency_ms": round(seconds * 1000.0, 3),
                    "worker": self._worker_id,
                },
            )
