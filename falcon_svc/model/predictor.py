"""Hold a loaded model and predict: the object the app keeps for its lifetime."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sklearn.pipeline import Pipeline

from falcon_svc.model.artifact import read_artifact
from falcon_svc.model.scorer import (
    PROBE_TEXTS,
    VERIFY_TOLERANCE,
    CompiledScorer,
    Scorer,
    SklearnScorer,
    UnsupportedPipelineError,
    compile_pipeline,
    max_difference,
)

if TYPE_CHECKING:
    from falcon_svc.model.signing import PublicKey

logger = logging.getLogger(__name__)

Compiler = Callable[[Pipeline], CompiledScorer]


@dataclass(frozen=True, slots=True)
class Prediction:
    """One text's result: the argmax label, its probability, and all probabilities."""

    label: str
    confidence: float
    probabilities: dict[str, float]


class Model:
    """A verified model plus the scorer chosen for it ("compiled" or "sklearn")."""

    def __init__(self, scorer: Scorer, scorer_name: str, metadata: dict[str, Any]) -> None:
        self._scorer = scorer
        self.name: str = str(metadata["name"])
        self.version: str = str(metadata["version"])
        self.kind: str = str(metadata["kind"])
        self.labels: tuple[str, ...] = tuple(str(label) for label in metadata["labels"])
        self.scorer: str = scorer_name
        self.metadata: dict[str, Any] = {**metadata, "scorer": scorer_name}

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Score already-normalised ``texts`` in one vectorised call."""
        if not texts:
            return []
        probabilities = self._scorer.predict_proba(list(texts))
        labels = self.labels
        predictions = []
        for row in probabilities.tolist():
            best = max(range(len(labels)), key=row.__getitem__)
            predictions.append(Prediction(labels[best], row[best], dict(zip(labels, row, strict=True))))
        return predictions

    def summary(self) -> dict[str, str]:
        """Return what identifies this model: its name, version, kind and scorer.

        The one shape for readiness (``/readyz``'s ``model``), ``falcon-svc check``
        and each ``/v1/models`` entry, which adds the labels and the metadata.
        """
        return {"name": self.name, "version": self.version, "kind": self.kind, "scorer": self.scorer}

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, version={self.version!r}, scorer={self.scorer!r})"


def model_from_pipeline(
    pipeline: Pipeline,
    metadata: dict[str, Any],
    *,
    fast_path: bool = True,
    compiler: Compiler = compile_pipeline,
) -> Model:
    """Wrap ``pipeline`` in a Model, compiling and verifying the fast path if asked.

    A scorer that cannot be compiled, or disagrees with ``predict_proba`` by more
    than VERIFY_TOLERANCE on the probe texts, is dropped for scikit-learn's own
    scorer: slower but right. That is logged as a WARNING and recorded in the
    metadata, because a silent 10x slowdown is an outage waiting to happen.
    """
    if not fast_path:
        return Model(SklearnScorer(pipeline), "sklearn", {**metadata, "fast_path": "disabled"})
    try:
        compiled = compiler(pipeline)
        difference = max_difference(compiled, pipeline, PROBE_TEXTS)
    except UnsupportedPipelineError as ex:
        reason = f"pipeline not compilable: {ex}"
    else:
        if difference <= VERIFY_TOLERANCE:
            return Model(compiled, "compiled", {**metadata, "verify_max_abs_diff": difference})
        reason = f"compiled scorer differs from predict_proba by {difference:.3g} (tolerance {VERIFY_TOLERANCE:g})"
    logger.warning("model %s: fast path disabled, using scikit-learn: %s", metadata.get("version"), reason)
    return Model(SklearnScorer(pipeline), "sklearn", {**metadata, "fast_path_fallback": reason})


def load_model(
    model_dir: str | os.PathLike[str],
    *,
    fast_path: bool = True,
    compiler: Compiler = compile_pipeline,
    public_keys: Sequence[PublicKey] = (),
) -> Model:
    """Load, verify and wrap the artifact in ``model_dir``; raise ModelLoadError.

    ``compiler`` is injectable so tests can hand in a deliberately wrong scorer.
    With ``public_keys`` the artifact must carry a signature by one of them.
    """
    pipeline, metadata = read_artifact(model_dir, public_keys=public_keys)
    model = model_from_pipeline(pipeline, metadata, fast_path=fast_path, compiler=compiler)
    logger.info(
        "loaded model %s %s (kind=%s, scorer=%s) from %s",
        model.name,
        model.version,
        model.kind,
        model.scorer,
        model_dir,
    )
    return model
