"""Build a tiny stand-in model (kind "dummy") from sentences embedded here.

It has the same artifact format and pipeline shape as the real model, so the HTTP
layer and the compiled scorer can be tested without the corpus, in well under a
second. Its predictions are not to be trusted.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from falcon_svc.model.artifact import write_artifact
from falcon_svc.model.vader import Lexicon
from falcon_svc.training.training import TrainingConfig, fit_pipeline

KIND = "dummy"

# A few VADER valences, so the dummy needs no data package at all.
DUMMY_VALENCES = {
    "good": 1.9,
    "great": 3.1,
    "love": 3.2,
    "excellent": 2.7,
    "happy": 2.7,
    "nice": 1.8,
    "bad": -2.5,
    "terrible": -2.1,
    "hate": -2.7,
    "awful": -2.0,
    "broken": -1.7,
    "worst": -3.1,
}
DUMMY_NEGATIONS = ("not", "never", "no", "don't", "isn't", "wasn't")
DUMMY_BOOSTERS = {"very": 0.293, "really": 0.293, "slightly": -0.293}
DUMMY_LEXICON = Lexicon(DUMMY_VALENCES, DUMMY_NEGATIONS, DUMMY_BOOSTERS)

DUMMY_SENTENCES = (
    ("positive", "I love this product, it is great."),
    ("positive", "Excellent service and very nice staff."),
    ("positive", "Really happy with my order."),
    ("positive", "Good value, works well."),
    ("positive", "The best purchase I made this year."),
    ("negative", "This is terrible, it arrived broken."),
    ("negative", "I hate it, worst purchase ever."),
    ("negative", "Awful support, nobody answered."),
    ("negative", "Bad quality and it stopped working."),
    ("negative", "Not good at all, I want a refund."),
    ("neutral", "The package arrived on Tuesday."),
    ("neutral", "The store opens at nine."),
    ("neutral", "My order number is 1234."),
    ("neutral", "The flight departs from gate 12."),
    ("neutral", "The manual is available online."),
)


def build_dummy_model(output_dir: str | os.PathLike[str]) -> Path:
    """Train the dummy model and write its artifact into ``output_dir``."""
    texts = [text for _, text in DUMMY_SENTENCES]
    labels = [label for label, _ in DUMMY_SENTENCES]
    config = replace(TrainingConfig(), min_df=1, tfidf_weight=1.0)
    pipeline = fit_pipeline(texts, labels, DUMMY_LEXICON, config, virtual_documents=False)
    metadata = {
        "kind": KIND,
        "description": "tiny stand-in trained on embedded sentences; NOT a real model",
        "training_data": {"source": "falcon_svc.training.dummy.DUMMY_SENTENCES", "rows": len(texts)},
        "metrics": {},
    }
    return write_artifact(pipeline, metadata, output_dir)
