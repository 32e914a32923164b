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
    "Texts classified, by predicted label and the model version that predicted it.",
    ["label", "version"],
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
# NOTE: the drift alert compares falcon_predictions_total's live mix with this.
MODEL_EXPECTED_LABEL_SHARE = Gauge(
    "falcon_model_expected_label_share",
    "Share of each label in the served model version's predictions on its evaluation set (metadata label_mix).",
    ["version", "label"],
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

# --- Dependencies and resilience -------------------------------------------
CACHE_HITS = Counter("falcon_cache_hits_total", "Texts answered from the cache (local tier or Redis).")
CACHE_MISSES = Counter("falcon_cache_misses_total", "Texts not in the cache, so classified by the model.")
CACHE_ERRORS = Counter(
    "falcon_cache_errors_total",
    "Cache operations that failed or were skipped, by reason (exception class, circuit_open, write_queue_full).",
    ["reason"],
)
IDEMPOTENCY = Counter(
    "falcon_idempotency_requests_total",
    "Requests carrying X-Idempotency-Key, by outcome (first, replayed, conflict, mismatch, unavailable;"
    " unrecorded: an answer Redis did not store).",
    ["outcome"],
)
CIRCUIT_STATE = Gauge(
    "falcon_circuit_breaker_state",
    "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open (worst across workers).",
    ["dependency"],
    multiprocess_mode="livemax",
)
CIRCUIT_TRANSITIONS = Counter(
    "falcon_circuit_breaker_transitions_total",
    "Circuit breaker state changes, by dependency and new state.",
    ["dependency", "to_state"],
)
RETRIES = Counter("falcon_dependency_retries_total", "Retried dependency calls, by dependency.", ["dependency"])
DEPENDENCY_LATENCY = Histogram(
    "falcon_dependency_call_duration_seconds",
    "Time spent in one call to a dependency, by dependency and operation.",
    ["dependency", "operation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DEPENDENCY_UP = Gauge(
    "falcon_dependency_up",
    "1 when the last call to the dependency succeeded, else 0 (worst across workers).",
    ["dependency"],
    multiprocess_mode="livemin",
)
LOG_QUEUE_DEPTH = Gauge(
    "falcon_request_log_queue_depth", "Request-log rows waiting in memory.", multiprocess_mode="livesum"
)
LOG_SPOOL_BYTES = Gauge(
    "falcon_request_log_spool_bytes", "Bytes of request-log rows spooled on disk.", multiprocess_mode="livemax"
)
LOG_REJECTED_BYTES = Gauge(
    "falcon_request_log_rejected_bytes",
    "Bytes of request-log rows PostgreSQL refused, kept in the spool directory (rejected-*.jsonl) for an operator.",
    multiprocess_mode="livemax",
)
LOG_ROWS = Counter(
    "falcon_request_log_rows_total",
    "Request-log rows by outcome: written, spooled, replayed, rejected (refused by PostgreSQL, kept aside), dropped.",
    ["outcome"],
)
LOG_BATCH_LATENCY = Histogram(
    "falcon_request_log_batch_duration_seconds",
    "Time to write one batch of request-log rows to PostgreSQL.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
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
