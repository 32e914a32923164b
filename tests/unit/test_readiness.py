"""Readiness policy: what makes a worker ready, ready but degraded, or not ready (falcon_svc.readiness)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from falcon_svc import metrics
from falcon_svc.dependencies import Dependencies
from falcon_svc.lifecycle import Lifecycle
from falcon_svc.model import Model
from falcon_svc.readiness import DUMMY_MODEL_WARNING, SLOW_SCORER_WARNING, Readiness
from falcon_svc.resilience import CircuitBreaker


def variant(model: Model, *, kind: str = "trained", scorer: str = "compiled") -> Model:
    """Return ``model`` relabelled as another kind of model served by another scorer."""
    return Model(model._scorer, scorer, {**model.metadata, "kind": kind})


def breaker(name: str, *, down: bool) -> CircuitBreaker:
    """Return a closed breaker, or one opened by a failure (threshold 1)."""
    found = CircuitBreaker(name, failure_threshold=1, reset_timeout=3600.0)
    if down:
        found.record_failure()
    return found


class FakeRequestLog:
    """Our RequestLog as readiness sees it: only its status."""

    def status(self) -> dict[str, Any]:
        return {"postgres": "up", "queue_depth": 3, "spool_bytes": 0}


def test_a_trained_compiled_model_with_healthy_dependencies_is_ready_without_warnings(model: Model):
    trained = variant(model)
    deps = Dependencies(breakers={"redis": breaker("redis", down=False)})
    ready, detail = Readiness(trained, Lifecycle(), deps).report()
    assert ready is True
    assert detail == {
        "status": "ready",
        "reasons": [],
        "model": trained.summary(),
        "dependencies": {"redis": {"healthy": True, "circuit": "closed"}},
        "degraded": [],
        "warnings": [],
    }


def test_without_a_model_the_worker_is_not_ready(model: Model):
    ready, detail = Readiness(None, Lifecycle()).report()
    assert ready is False
    assert detail["status"] == "not_ready" and detail["reasons"] == ["model_not_loaded"], detail
    assert "model" not in detail, "there is no model to describe"


def test_a_draining_worker_is_not_ready_and_the_gauge_says_so(model: Model):
    lifecycle = Lifecycle()
    metrics.DRAINING.set(0)
    assert Readiness(variant(model), lifecycle).report()[0] is True
    assert REGISTRY.get_sample_value("falcon_worker_draining") == 0, "not draining yet"
    lifecycle.begin_drain()
    ready, detail = Readiness(variant(model), lifecycle).report()
    assert ready is False and detail["status"] == "not_ready" and detail["reasons"] == ["draining"], detail
    assert REGISTRY.get_sample_value("falcon_worker_draining") == 1, "readiness sets the gauge (not the handler)"


def test_every_reason_is_listed_in_order():
    lifecycle = Lifecycle()
    lifecycle.begin_drain()
    assert Readiness(None, lifecycle).report()[1]["reasons"] == ["model_not_loaded", "draining"]


def test_a_dependency_that_is_down_degrades_but_keeps_the_worker_ready(model: Model):
    deps = Dependencies(
        breakers={
            "redis": breaker("redis", down=True),
            "postgres": breaker("postgres", down=True),
            "other": breaker("other", down=False),
        }
    )
    ready, detail = Readiness(variant(model), Lifecycle(), deps).report()
    assert ready is True and detail["status"] == "ready", "it still classifies, so it still gets traffic"
    assert detail["degraded"] == ["postgres", "redis"], "sorted, healthy ones left out"
    assert detail["dependencies"]["redis"] == {"healthy": False, "circuit": "open"}, detail
    assert detail["warnings"] == [
        "postgres unavailable: serving without it",
        "redis unavailable: serving without it",
    ]


@pytest.mark.parametrize(
    ("kind", "scorer", "expected"),
    [
        ("trained", "compiled", []),
        ("dummy", "compiled", [DUMMY_MODEL_WARNING]),
        ("trained", "sklearn", [SLOW_SCORER_WARNING]),
        ("dummy", "sklearn", [DUMMY_MODEL_WARNING, SLOW_SCORER_WARNING]),
    ],
)
def test_a_dummy_model_and_the_slow_scorer_are_warnings_not_reasons(model: Model, kind, scorer, expected):
    ready, detail = Readiness(variant(model, kind=kind, scorer=scorer), Lifecycle()).report()
    assert ready is True and detail["reasons"] == []
    assert detail["warnings"] == expected


def test_the_request_log_reports_only_when_there_is_one(model: Model):
    assert "request_log" not in Readiness(variant(model), Lifecycle()).report()[1]
    deps = Dependencies(request_log=FakeRequestLog())  # type: ignore[arg-type]
    detail = Readiness(variant(model), Lifecycle(), deps).report()[1]
    assert detail["request_log"] == FakeRequestLog().status()
    # NOTE: the keys' order is the JSON body's order on /readyz.
    assert list(detail) == ["status", "reasons", "model", "request_log", "dependencies", "degraded", "warnings"]
