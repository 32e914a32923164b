"""Declare every Prometheus metric in one place, and expose them correctly.

Under gunicorn each worker is a process, so prometheus-client runs in multiprocess
mode: ``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is imported
(``gunicorn_conf`` does it) and the master marks dead workers so their live
gauges vanish. Outside gunicorn (tests, scripts) the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets from 1 ms to 5 s: the fast path answers in well under 5 ms, so the low
# end needs resolution; the top catches a saturated or stalled worker.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INFERENCE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 50)

REQUESTS = Counter(
    "falcon_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
REQUEST_LATENCY = Histogram(
    "falcon_http_request_duration_seconds",
    "Time from request start to response ready, by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "falcon_http_requests_in_flight",
    "Requests being handled right now.",
    multiprocess_mode="livesum",
)
INFERENCE_LATENCY = Histogram(
    "falcon_inference_duration_seconds",
    "Time spent in the model for one call (single text or whole batch), by scorer.",
    ["scorer"],
    buckets=INFERENCE_BUCKETS,
)
BATCH_SIZE = Histogram(
    "falcon_inference_batch_size",
    "Number of texts per inference call.",
    buckets=BATCH_SIZE_BUCKETS,
)
PREDICTIONS = Counter(
    "falcon_predictions_total",
    "Texts classified, by predicted label.",
    ["label"],
)
INPUT_ERRORS = Counter(
    "falcon_input_errors_total",
    "Requests rejected for bad input, by error code.",
    ["code"],
)
MODEL_INFO = Gauge(
    "falcon_model_info",
    "The loaded model (value 1), labelled with its name, version, kind and scorer.",
    ["name", "version", "kind", "scorer"],
    multiprocess_mode="livemax",
)
WORKER_START_TIME = Gauge(
    "falcon_worker_start_time_seconds",
    "Unix time at which this worker process loaded the app.",
    multiprocess_mode="liveall",
)
DRAINING = Gauge(
    "falcon_worker_draining",
    "1 while a worker is draining after SIGTERM, else 0.",
    multiprocess_mode="livemax",
)


def is_multiprocess() -> bool:
    """Tell whether metrics are shared through files by several worker processes."""
    return bool(os.environ.get(MULTIPROC_ENV))


def render() -> tuple[bytes, str]:
    """Return the exposition body and its content type for ``/metrics``.

    NOTE: in multiprocess mode a fresh registry is built per scrape, as
    prometheus-client documents; the collector reads every worker's files.
    """
    if is_multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (called from gunicorn's ``child_exit``)."""
    if is_multiprocess():
        multiprocess.mark_process_dead(pid)
