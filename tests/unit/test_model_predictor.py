"""Model: predictions, the compiled fast path, and its loud fallback."""

import logging
import math

import numpy as np
import pytest

from falcon_svc.model import Model, Prediction, load_model
from falcon_svc.model.scorer import compile_pipeline
from falcon_svc.training import build_dummy_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_dummy_model(tmp_path_factory.mktemp("dummy") / "sentiment")


def test_dummy_model_loads_compiled(artifact):
    model = load_model(artifact)
    assert isinstance(model, Model)
    assert model.kind == "dummy"
    assert model.labels == ("negative", "neutral", "positive")
    assert model.scorer == "compiled" and model.metadata["scorer"] == "compiled"
    assert model.name == "sentiment" and model.version


def test_predictions_are_well_formed(artifact):
    model = load_model(artifact)
    texts = ["I love this product, it is great.", "The package arrived on Tuesday.", ""]
    predictions = model.predict(texts)
    assert len(predictions) == len(texts)
    for prediction in predictions:
        assert isinstance(prediction, Prediction)
        assert list(prediction.probabilities) == list(model.labels)
        assert math.isclose(sum(prediction.probabilities.values()), 1.0, abs_tol=1e-9)
        assert prediction.confidence == max(prediction.probabilities.values())
        assert prediction.probabilities[prediction.label] == prediction.confidence
    assert predictions[0].label == "positive", predictions[0]
    assert model.predict([]) == []


def test_compiled_and_sklearn_models_agree(artifact):
    fast = load_model(artifact)
    slow = load_model(artifact, fast_path=False)
    assert slow.scorer == "sklearn"
    texts = ["terrible and broken", "not good at all", "great", "gate 12", ""]
    for a, b in zip(fast.predict(texts), slow.predict(texts), strict=True):
        assert a.label == b.label
        for label in fast.labels:
            assert abs(a.probabilities[label] - b.probabilities[label]) <= 1e-9


def test_failed_verification_falls_back_loudly(artifact, caplog):
    def perturbed(pipeline):
        scorer = compile_pipeline(pipeline)
        # NOTE: shift one class only; the same shift for every class cancels in softmax.
        scorer.tfidf_coef_t = scorer.tfidf_coef_t + np.array([1e-3, 0.0, 0.0])
        return scorer

    with caplog.at_level(logging.WARNING, logger="falcon_svc.model.predictor"):
        model = load_model(artifact, compiler=perturbed)
    assert model.scorer == "sklearn"
    assert "differs" in model.metadata["fast_path_fallback"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "fast path disabled" in warnings[0].getMessage()
    # The fallback still answers, with the pipeline's own probabilities.
    reference = load_model(artifact, fast_path=False).predict(["great"])[0]
    assert model.predict(["great"])[0] == reference


def test_uncompilable_pipeline_falls_back(artifact, caplog):
    from falcon_svc.model.scorer import UnsupportedPipelineError

    def refuse(pipeline):
        raise UnsupportedPipelineError("not today")

    with caplog.at_level(logging.WARNING):
        model = load_model(artifact, compiler=refuse)
    assert model.scorer == "sklearn"
    assert "not today" in model.metadata["fast_path_fallback"]
    assert any("not today" in r.getMessage() for r in caplog.records)


def test_batch_probabilities_match_single_calls(artifact):
    model = load_model(artifact)
    texts = [f"order {i} was great" if i % 2 else f"item {i} arrived broken" for i in range(50)]
    batch = [p.probabilities for p in model.predict(texts)]
    singles = [model.predict([text])[0].probabilities for text in texts]
    np.testing.assert_allclose([list(p.values()) for p in batch], [list(p.values()) for p in singles], atol=1e-12)
