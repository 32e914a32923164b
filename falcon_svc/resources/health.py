"""Liveness and readiness probes (``/healthz``, ``/readyz``); the policy is ``falcon_svc.readiness``."""

from __future__ import annotations

import falcon

from falcon_svc.access import InternalAccess
from falcon_svc.readiness import Readiness, public_detail


class LivenessResource:
    """``GET /healthz``: the process answers; nothing else is checked."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "alive"}

    # Load balancers and uptime checkers often probe with HEAD; Falcon sends no body.
    on_head = on_get


class ReadinessResource:
    """``GET /readyz``: 200 when the model is loaded and the worker is not draining.

    The status code and ``status`` are public; the detail (reasons, model,
    breakers, spool, warnings) goes to internal clients only (``falcon_svc.access``).
    """

    def __init__(self, readiness: Readiness, access: InternalAccess) -> None:
        self._readiness = readiness
        self._access = access

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready, detail = self._readiness.report()
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = detail if self._access.allows(req.remote_addr, req.headers) else public_detail(detail)

    on_head = on_get
