"""Falcon middleware: the request context (ids, timing, metrics, log row) and idempotency."""

from falcon_svc.middleware.context import RequestContext, elapsed_ms
from falcon_svc.middleware.idempotency import IdempotencyMiddleware

__all__ = ["IdempotencyMiddleware", "RequestContext", "elapsed_ms"]
