"""``GET /v1/models``: what is loaded, for operators and clients."""

from __future__ import annotations

import posixpath
from typing import Any

import falcon

from falcon_svc.model import Model


class ModelsResource:
    """List the loaded model with its metadata (one model per service)."""

    def __init__(self, model: Model) -> None:
        self._body = {"models": [model_entry(model)]}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._body


def model_entry(model: Model) -> dict[str, Any]:
    """Return ``model``'s public description: its summary, then its labels and metadata."""
    return {**model.summary(), "labels": list(model.labels), "metadata": _without_absolute_paths(model.metadata)}


def _without_absolute_paths(value: Any) -> Any:
    """Return ``value`` with every absolute path cut to its file name.

    NOTE: artifacts trained before 2026-12 recorded where their evaluation sets
    lay on the training machine; a public endpoint should not tell anyone the
    layout of our file systems.
    """
    if isinstance(value, dict):
        return {key: _without_absolute_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_absolute_paths(item) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        return posixpath.basename(value)
    return value
