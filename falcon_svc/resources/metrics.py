"""``GET /metrics``: Prometheus exposition of every worker's metrics."""

from __future__ import annotations

import falcon

from falcon_svc import metrics


class MetricsResource:
    """Render all metrics; nginx keeps this route off the public side."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, content_type = metrics.render()
        resp.data = body
        resp.content_type = content_type
