"""Give every request an id, time it, count it and log it as one JSON line."""

from __future__ import annotations

import logging
import os
import re
import time

import falcon
from prometheus_client import Counter, Histogram

from falcon_svc import metrics
from falcon_svc.inference import Inference
from falcon_svc.logs import AccessLog
from falcon_svc.requestlog import LogRow, RequestLog
from falcon_svc.requestlog.rows import text_hmac

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is honoured only if it is short and plain, so it is safe in logs,
# headers and the database (no spaces, quotes or control characters).
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
UNMATCHED_ROUTE = "unmatched"
# ACCESS_LOG mode -> the lowest status that gets an access line ("off" has no AccessLog).
ACCESS_MIN_STATUS = {"all": 0, "errors": 400, "off": 1000}
# Clients may send any method name; only these become metric labels.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Routes whose every request gets a row in PostgreSQL's request_log (probes and
# scrapes would only bury them).
LOGGED_ROUTES = frozenset(
    {"/infer", "/infer/batch", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"}
)
# NOTE: a 401 gets no row. Anyone can send made-up bearer keys, limited only by
# nginx's per-address rate, and each row would be a database write on our disk;
# the access log line (the journal) still records the refusal. Other 4xx are
# answers to an authenticated client and keep their row.
UNLOGGED_STATUSES = frozenset({401})
# nginx's "<$request_id> <$msec>" for this client request (nginx/falcon-svc.conf.j2),
# the same on every unit nginx tries it on.
PROXY_REQUEST_HEADER = "X-Falcon-Proxy-Request"
_PROXY_REQUEST = re.compile(r"([0-9a-f]{32}) ([0-9]{10}\.[0-9]{3})")
# nginx's arrival time is trusted for received_at only this close to our own clock:
# the header is nginx's, but a local client could send one too.
PROXY_CLOCK_SKEW_SECONDS = 60.0
# Answers nginx retries on the next unit (proxy_next_upstream http_502 http_503):
# their rows keep a key of their own, so the retry's answer is logged too.
RETRIED_STATUSES = frozenset({502, 503})


def new_request_id() -> str:
    """Return a fresh random id (128 bits, hex)."""
    return os.urandom(16).hex()


def request_id_for(header_value: str | None) -> str:
    """Return the client's id if it is sane, else a fresh one."""
    if header_value and _SANE_REQUEST_ID.fullmatch(header_value):
        return header_value
    return new_request_id()


def proxy_request(header_value: str | None, now: float) -> tuple[str, float] | None:
    """Return (log_id, received_at) from nginx's request header, or None when absent or not believable.

    A request nginx sends to a second unit after the first died mid-request carries
    the same header, so both runs make the same row key and ``ON CONFLICT DO
    NOTHING`` stores the request once.
    """
    if not header_value:
        return None
    match = _PROXY_REQUEST.fullmatch(header_value)
    if match is None:
        return None
    arrived = float(match.group(2))
    if abs(now - arrived) > PROXY_CLOCK_SKEW_SECONDS:
        return None
    return match.group(1), arrived


def elapsed_ms(req: falcon.Request) -> float:
    """Return the milliseconds since the request started, rounded to microseconds."""
    started: float = req.context.started
    return round((time.perf_counter() - started) * 1000.0, 3)


class RequestContext:
    """Falcon middleware: request id, timing, metrics and the access log line."""

    def __init__(
        self,
        worker_id: str,
        access_log: str = "all",
        request_log: RequestLog | None = None,
        *,
        text_hmac_key: bytes | None = None,
    ) -> None:
        """``access_log`` (ACCESS_LOG): ``all``, ``errors`` (status >= 400) or ``off``.

        ``text_hmac_key`` (LOG_TEXT_HMAC_KEY) keys the logged text digest; without it none is logged.
        """
        self._worker_id = worker_id
        self._access_log = AccessLog() if access_log != "off" else None
        # NOTE: an access line costs the worker ~20 us and journald about as much again
        # (scripts/bench/bench_access_log.py); behind nginx, whose JSON access log has
        # every request with its id, "errors" keeps the lines an operator greps for.
        self._access_min_status = ACCESS_MIN_STATUS[access_log]
        self._request_log = request_log
        self._text_hmac_key = text_hmac_key or None
        if request_log is not None and self._text_hmac_key is None:
            # NOTE: an unkeyed digest would be reversible by a dictionary of short
            # texts, so rather none than that; said once per worker, at start.
            logger.warning("LOG_TEXT_HMAC_KEY is unset: request_log rows are written with text_hmac NULL")
        # (route, method, status) -> labelled metric children: .labels() costs
        # microseconds per call, and the key space is bounded (routes, methods).
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        now = time.time()
        proxied = proxy_request(req.get_header(PROXY_REQUEST_HEADER), now)
        req.context.proxy_log_id = proxied[0] if proxied else None
        req.context.received_at = proxied[1] if proxied else now
        req.context.request_id = request_id_for(req.get_header(REQUEST_ID_HEADER))
        metrics.IN_FLIGHT.inc()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        request_id = req.context.request_id
        # An idempotent replay answers with the original request's id.
        resp.set_header(REQUEST_ID_HEADER, req.context.get("response_request_id") or request_id)
        seconds = time.perf_counter() - req.context.started
        route = req.uri_template or UNMATCHED_ROUTE
        status = resp.status_code
        method = req.method if req.method in KNOWN_METHODS else "other"
        children = self._children.get((route, method, status))
        if children is None:
            children = (metrics.REQUESTS.labels(route, method, str(status)), metrics.REQUEST_LATENCY.labels(route))
            self._children[(route, method, status)] = children
        metrics.IN_FLIGHT.dec()
        children[0].inc()
        children[1].observe(seconds)
        if self._request_log is not None and route in LOGGED_ROUTES and status not in UNLOGGED_STATUSES:
            self._request_log.submit(
                self._log_row(req, request_id=request_id, route=route, method=method, status=status, seconds=seconds)
            )
        if self._access_log is not None and status >= self._access_min_status:
            self._access_log.write(
                {
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "path": req.path,
                    "status": status,
                    "latency_ms": round(seconds * 1000.0, 3),
                    "worker": self._worker_id,
                    # The API key's id (falcon_svc/auth), never the key; None with API keys off.
                    "client_key_id": req.context.get("client_key_id"),
                    **self._outcome(req),
                }
            )

    @staticmethod
    def _outcome(req: falcon.Request) -> dict[str, object]:
        """Return what the access line adds when there is one: the error's code and field, the model version."""
        outcome: dict[str, object] = {}
        # Stashed by falcon_svc.errors.serialize_error for every error answer.
        error_code = req.context.get("error_code")
        if error_code is not None:
            outcome["code"] = error_code
            outcome["field"] = req.context.get("error_field")
        inference: Inference | None = req.context.get("inference")
        if inference is not None:
            outcome["model_version"] = inference.model_version
        return outcome

    def _log_row(
        self, req: falcon.Request, *, request_id: str, route: str, method: str, status: int, seconds: float
    ) -> LogRow:
        """Build the request_log row: who asked what, what the model said, how fast.

        What was asked and said comes from the ``Inference`` an inference resource
        left on ``req.context``; a request refused before classifying has none,
        and those columns stay NULL.
        """
        model_version: str | None = None
        label: str | None = None
        confidence: float | None = None
        n_texts: int | None = None
        cache_hit: bool | None = None
        text_length: int | None = None
        digest: str | None = None
        text: str | None = None
        inference: Inference | None = req.context.get("inference")
        if inference is not None:
            texts, results = inference.texts, inference.results
            model_version = inference.model_version
            n_texts = len(results)
            cache_hit = all(result.cache_hit for result in results)
            text_length = sum(map(len, texts))
            if n_texts == 1:
                label = results[0].prediction.label
                confidence = results[0].prediction.confidence
                text = texts[0]
            else:
                text = "\x1e".join(texts)
            # A batch is identified by the HMAC of its texts' digests, in order.
            digest = text_hmac(self._text_hmac_key, [result.digest for result in results])
        return LogRow(
            # NOTE: the key is nginx's id of the client request (the same for nginx's
            # retries of it) or ours, never the client's X-Request-ID, which a client
            # may repeat: each request gets its own row.
            log_id=(
                req.context.proxy_log_id
                if req.context.proxy_log_id and status not in RETRIED_STATUSES
                else new_request_id()
            ),
            request_id=request_id,
            received_at=req.context.received_at,
            route=route,
            method=method,
            status=status,
            worker_id=self._worker_id,
            model_version=model_version,
            label=label,
            confidence=confidence,
            n_texts=n_texts,
            cache_hit=cache_hit,
            idempotent_replay=bool(req.context.get("idempotent_replay")),
            latency_ms=round(seconds * 1000.0, 3),
            text_length=text_length,
            text_hmac=digest,
            text=text,
            # NOTE: set by the API-key middleware: the key's id, never the key.
            client_key_id=req.context.get("client_key_id"),
        )
