"""Every series name falcon_svc.metrics can expose: what docs and rules may name."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from falcon_svc import metrics

# The series a metric of each type exposes, by suffix.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def metric_series() -> set[str]:
    """Return every series name falcon_svc.metrics can expose."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            names.update(value._name + suffix for suffix in _SUFFIXES[value._type])
    return names
