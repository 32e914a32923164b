"""``GET /metrics``: Prometheus exposition of every worker's metrics, for internal clients only."""

from __future__ import annotations

import falcon

from falcon_svc import metrics
from falcon_svc.access import InternalAccess
from falcon_svc.errors import not_found_sink


class MetricsResource:
    """Render all metrics to an internal client; anyone else gets the same 404 as an unknown route.

    nginx refuses /metrics too; this holds even where nginx is bypassed or misconfigured.
    """

    def __init__(self, access: InternalAccess) -> None:
        self._access = access

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._access.allows(req.remote_addr, req.headers):
            # NOTE: 404, not 403: a public client learns nothing about what exists here.
            not_found_sink(req, resp)
        body, content_type = metrics.render()
        resp.data = body
        resp.content_type = content_type
