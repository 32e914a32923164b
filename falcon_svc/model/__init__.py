"""The sentiment model: load a verified artifact, predict, and train new ones.

The app codes against this module only::

    model = load_model("models/sentiment")   # raises ModelLoadError
    model.predict(["The package arrived on Tuesday."])  # -> [Prediction(...)]

Artifacts are built by scripts/train_model.py (train_model, or build_dummy_model
when the corpus is not installed) and never committed.
"""

from falcon_svc.model.artifact import ModelLoadError
from falcon_svc.model.dummy import build_dummy_model
from falcon_svc.model.predictor import Model, Prediction, load_model
from falcon_svc.model.training import train_model

__all__ = [
    "Model",
    "ModelLoadError",
    "Prediction",
    "build_dummy_model",
    "load_model",
    "train_model",
]
