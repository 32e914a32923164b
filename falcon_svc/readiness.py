"""Decide whether this worker should get traffic: ready, ready but degraded, or not ready.

Not ready (503 on /readyz and the v2 ready routes) only when the worker cannot
serve: no model loaded, or draining after SIGTERM. A dependency that is down
(Redis, PostgreSQL) degrades the worker but leaves it ready: it still
classifies, so it should still get traffic, and the detail says what is missing.
Everything an operator should know but that does not stop traffic (a dummy
model, the slow scorer, a degraded dependency) is a warning in the detail.

The detail is for the host (``falcon_svc.access``); the public sees only
``status``: breaker states, spool sizes and the model say too much about us.
"""

from __future__ import annotations

from typing import Any

from falcon_svc import metrics
from falcon_svc.dependencies import Dependencies
from falcon_svc.lifecycle import Lifecycle
from falcon_svc.model import Model

DUMMY_MODEL_WARNING = "dummy model loaded: predictions are not meaningful (train the real model)"
SLOW_SCORER_WARNING = "fast path off: serving with scikit-learn's predict_proba"


class Readiness:
    """Decide whether this worker should get traffic, and why not."""

    def __init__(self, model: Model | None, lifecycle: Lifecycle, dependencies: Dependencies | None = None) -> None:
        self._model = model
        self._lifecycle = lifecycle
        self._deps = dependencies or Dependencies()

    def report(self) -> tuple[bool, dict[str, Any]]:
        """Return (ready, JSON detail): status, reasons, model, dependencies, degraded, warnings."""
        reasons = []
        if self._model is None:
            reasons.append("model_not_loaded")
        if self._lifecycle.draining:
            reasons.append("draining")
            # NOTE: set here, not in the SIGTERM handler (see Lifecycle.begin_drain).
            metrics.DRAINING.set(1)
        detail: dict[str, Any] = {"status": "not_ready" if reasons else "ready", "reasons": reasons}
        warnings = []
        if self._model is not None:
            detail["model"] = self._model.summary()
            if self._model.kind == "dummy":
                warnings.append(DUMMY_MODEL_WARNING)
            if self._model.scorer != "compiled":
                warnings.append(SLOW_SCORER_WARNING)
        dependencies = self._deps.status()
        degraded = sorted(name for name, state in dependencies.items() if not state["healthy"])
        if self._deps.request_log is not None:
            detail["request_log"] = self._deps.request_log.status()
        detail["dependencies"] = dependencies
        detail["degraded"] = degraded
        warnings.extend(f"{name} unavailable: serving without it" for name in degraded)
        detail["warnings"] = warnings
        return not reasons, detail


def public_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """Return what anyone may see of a readiness report: its ``status`` alone."""
    return {"status": detail["status"]}
