"""Build model artifacts: read the data, fit the pipeline, evaluate, write.

Kept apart from falcon_svc.model, which is all a worker imports: training needs
the tweet corpus, vaderSentiment's tables and scikit-learn's metrics, serving none
of them. The artifact it writes is read by falcon_svc.model.artifact.
"""

from falcon_svc.training.dummy import build_dummy_model
from falcon_svc.training.training import TrainingConfig, train_model

__all__ = [
    "TrainingConfig",
    "build_dummy_model",
    "train_model",
]
