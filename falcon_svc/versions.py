"""The model versions one worker answers with: the one it serves, and others a client may name.

A worker serves one version by default (the store's active one, or its port's canary
pin) and keeps the store's active and previous versions loaded beside it, so
``/v2/models/sentiment/versions/V/infer`` can compare them side by side. Only the
served version uses the response cache: the others answer rare, explicit requests,
and their keys would only crowd the served version's out of the local tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import falcon

from falcon_svc.errors import APIError
from falcon_svc.inference import Classifier
from falcon_svc.model import Model


class ServedVersions:
    """Look up the classifier a request names; describe every loaded version."""

    def __init__(
        self, serving: Classifier, others: Mapping[str, Model] | None = None, active: str | None = None
    ) -> None:
        self.serving = serving
        self._by_version = {serving.model.version: serving}
        for version, model in (others or {}).items():
            self._by_version.setdefault(version, Classifier(model))
        # NOTE: without a store the served version is the active one by definition.
        self.active = active or serving.model.version

    @property
    def name(self) -> str:
        return self.serving.model.name

    def models(self) -> list[Model]:
        """Return every loaded model, the served one first."""
        return [classifier.model for classifier in self._by_version.values()]

    def versions(self) -> list[str]:
        """Return every loaded version, the served one first."""
        return list(self._by_version)

    def classifier(self, name: str, version: str | None) -> Classifier:
        """Return the classifier for ``name`` (and ``version``); raise a 404 APIError for an unknown one."""
        if name != self.name:
            raise APIError(
                falcon.HTTP_404, "model_not_found", f"No model named {name!r}; this server serves {self.name!r}."
            )
        if version is None:
            return self.serving
        classifier = self._by_version.get(version)
        if classifier is None:
            raise APIError(
                falcon.HTTP_404,
                "model_version_not_found",
                f"Model {name!r} has no loaded version {version!r}; this server has "
                f"{', '.join(repr(loaded) for loaded in self._by_version)} (serving {self.serving.model.version!r}).",
            )
        return classifier

    def describe(self, model: Model) -> dict[str, Any]:
        """Return whether ``model`` is the served and the active version."""
        return {"serving": model is self.serving.model, "active": model.version == self.active}
