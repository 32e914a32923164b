"""The sentiment model as a worker serves it: load a verified artifact and predict.

The app codes against this module only::

    model = load_model("models/sentiment")   # raises ModelLoadError
    model.predict(["The package arrived on Tuesday."])  # -> [Prediction(...)]

Artifacts are built by falcon_svc.training (scripts/train_model.py, ``falcon-svc
train``) and never committed. Nothing here imports the training package, so a
worker loads neither the training data nor vaderSentiment.
"""

from falcon_svc.model.artifact import ModelLoadError
from falcon_svc.model.predictor import Model, Prediction, load_model

__all__ = [
    "Model",
    "ModelLoadError",
    "Prediction",
    "load_model",
]
