"""``GET /v1/models``: the loaded model versions, for clients (public) and operators (internal)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import falcon

from falcon_svc.access import InternalAccess
from falcon_svc.model import Model
from falcon_svc.versions import ServedVersions

# What any client may know of a model: enough to call it and read its answers.
PUBLIC_FIELDS = ("name", "version", "labels", "serving", "active")


class ModelsResource:
    """List the loaded versions, the served one first: name, version, labels, which is served and active.

    Internal clients get each version's metadata too.
    """

    def __init__(self, versions: ServedVersions, access: InternalAccess) -> None:
        self._access = access
        internal = [model_entry(model, versions.describe(model)) for model in versions.models()]
        self._internal_body = {"models": internal}
        self._public_body = {"models": [{name: entry[name] for name in PUBLIC_FIELDS} for entry in internal]}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        internal = self._access.allows(req.remote_addr, req.headers)
        resp.media = self._internal_body if internal else self._public_body


def model_entry(model: Model, roles: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """Return ``model``'s internal description: its summary, its roles, then its labels and metadata."""
    return {
        **model.summary(),
        **(roles or {}),
        "labels": list(model.labels),
        "metadata": _without_absolute_paths(model.metadata),
    }


def _without_absolute_paths(value: Any) -> Any:
    """Return ``value`` with every absolute path cut to its file name.

    NOTE: artifacts trained before 2026-12 recorded where their evaluation sets
    lay on the training machine; even the host's operators need not read the
    layout of the training machine's file systems.
    """
    if isinstance(value, dict):
        return {key: _without_absolute_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_absolute_paths(item) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        return posixpath.basename(value)
    return value
