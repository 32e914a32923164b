"""``GET /v1/models``: what is loaded, for operators and clients."""

from __future__ import annotations

import falcon

from falcon_svc.model import Model


class ModelsResource:
    """List the loaded model with its metadata (one model per service)."""

    def __init__(self, model: Model) -> None:
        self._body = {"models": [model_summary(model)]}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._body


def model_summary(model: Model) -> dict:
    """Return the public description of ``model``."""
    return {
        "name": model.name,
        "version": model.version,
        "kind": model.kind,
        "scorer": model.scorer,
        "labels": list(model.labels),
        "metadata": model.metadata,
    }
