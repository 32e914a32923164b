"""Liveness and readiness probes (``/healthz``, ``/readyz``)."""

from __future__ import annotations

from typing import Any

import falcon

from falcon_svc import metrics
from falcon_svc.dependencies import Dependencies
from falcon_svc.lifecycle import Lifecycle
from falcon_svc.model import Model


class Readiness:
    """Decide whether this worker should get traffic, and why not."""

    def __init__(self, model: Model | None, lifecycle: Lifecycle, dependencies: Dependencies | None = None) -> None:
        self._model = model
        self._lifecycle = lifecycle
        self._deps = dependencies or Dependencies()

    def report(self) -> tuple[bool, dict[str, Any]]:
        """Return (ready, JSON detail)."""
        reasons = []
        if self._model is None:
            reasons.append("model_not_loaded")
        if self._lifecycle.draining:
            reasons.append("draining")
            metrics.DRAINING.set(1)
        detail: dict[str, Any] = {"status": "not_ready" if reasons else "ready", "reasons": reasons}
        warnings = []
        if self._model is not None:
            detail["model"] = {
                "name": self._model.name,
                "version": self._model.version,
                "kind": self._model.kind,
                "scorer": self._model.scorer,
            }
            if self._model.kind == "dummy":
                warnings.append("dummy model loaded: predictions are not meaningful (train the real model)")
            if self._model.scorer != "compiled":
                warnings.append("fast path off: serving with scikit-learn's predict_proba")
        # NOTE: a dependency that is down degrades the service but does not make
        # it unready: it still classifies, so it should still get traffic.
        dependencies = self._deps.status()
        degraded = sorted(name for name, state in dependencies.items() if not state["healthy"])
        if self._deps.request_log is not None:
            detail["request_log"] = self._deps.request_log.status()
        detail["dependencies"] = dependencies
        detail["degraded"] = degraded
        warnings.extend(f"{name} unavailable: serving without it" for name in degraded)
        detail["warnings"] = warnings
        return not reasons, detail


class LivenessResource:
    """``GET /healthz``: the process answers; nothing else is checked."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "alive"}

    # Load balancers and uptime checkers often probe with HEAD; Falcon sends no body.
    on_head = on_get


class ReadinessResource:
    """``GET /readyz``: 200 when the model is loaded and the worker is not draining."""

    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready, detail = self._readiness.report()
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = detail

    on_head = on_get
