"""The compiled scorer must equal the pipeline's predict_proba to 1e-9."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline

from falcon_svc.model.dummy import (
    DUMMY_BOOSTERS,
    DUMMY_NEGATIONS,
    DUMMY_SENTENCES,
    DUMMY_VALENCES,
)
from falcon_svc.model.scorer import (
    PROBE_TEXTS,
    VERIFY_TOLERANCE,
    UnsupportedPipelineError,
    compile_pipeline,
    max_difference,
)
from falcon_svc.model.training import TrainingConfig, fit_pipeline
from falcon_svc.text import normalize

LEXICON = (DUMMY_VALENCES, DUMMY_NEGATIONS, DUMMY_BOOSTERS)
TEXTS = [text for _, text in DUMMY_SENTENCES]
LABELS = [label for label, _ in DUMMY_SENTENCES]


def small_pipeline(labels=LABELS, texts=TEXTS, **config) -> Pipeline:
    """Fit the production pipeline shape on the embedded sentences (milliseconds)."""
    cfg = replace(TrainingConfig(), min_df=1, **config)
    return fit_pipeline(texts, labels, LEXICON, cfg, virtual_documents=False)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return small_pipeline()


@pytest.fixture(scope="module")
def compiled(pipeline):
    return compile_pipeline(pipeline)


def assert_matches(compiled, pipeline, texts):
    texts = list(texts)
    expected = pipeline.predict_proba(texts)
    batch = compiled.predict_proba(texts)
    assert batch.shape == expected.shape
    worst = float(np.max(np.abs(batch - expected))) if texts else 0.0
    assert worst <= VERIFY_TOLERANCE, f"batch differs by {worst:g} on {texts!r}"
    for text, row in zip(texts, expected, strict=True):
        single = compiled.predict_proba([text])[0]
        worst = float(np.max(np.abs(single - row)))
        assert worst <= VERIFY_TOLERANCE, f"single text differs by {worst:g} on {text!r}"


def test_probe_texts_match(compiled, pipeline):
    assert_matches(compiled, pipeline, PROBE_TEXTS)
    assert max_difference(compiled, pipeline, PROBE_TEXTS) <= VERIFY_TOLERANCE


def test_training_sentences_and_batches_of_every_size_match(compiled, pipeline):
    for size in (1, 2, 3, 7, len(TEXTS)):
        assert_matches(compiled, pipeline, TEXTS[:size])


def test_empty_vocabulary_texts_give_the_intercept_only_answer(compiled, pipeline):
    texts = ["", "zzz qqq", "12345", "\u00bf?", "\U0001f600"]
    assert_matches(compiled, pipeline, texts)


def test_empty_batch_returns_no_rows(compiled):
    assert compiled.predict_proba([]).shape == (0, 3)


WORDS = sorted({word for text in TEXTS for word in text.lower().replace(".", " ").split()})
VOCAB_TEXT = st.lists(
    st.sampled_from(WORDS + list(DUMMY_VALENCES) + list(DUMMY_NEGATIONS) + ["but", "!", "@x", "#y"]),
    max_size=25,
).map(" ".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=80), VOCAB_TEXT), min_size=1, max_size=8))
def test_generated_texts_match(compiled, pipeline, texts):
    assert_matches(compiled, pipeline, [normalize(text) for text in texts])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_unnormalised_unicode_still_matches(compiled, pipeline, text):
    # Callers normalise, but agreement must not depend on it.
    assert_matches(compiled, pipeline, [text])


def test_binary_pipeline_uses_the_logistic_function():
    keep = [i for i, label in enumerate(LABELS) if label != "neutral"]
    pipeline = small_pipeline([LABELS[i] for i in keep], [TEXTS[i] for i in keep])
    assert_matches(compile_pipeline(pipeline), pipeline, PROBE_TEXTS + tuple(TEXTS))


def test_other_settings_compile_exactly():
    pipeline = small_pipeline(tfidf_weight=0.3, ngram_max=3, c=10.0)
    assert_matches(compile_pipeline(pipeline), pipeline, PROBE_TEXTS + tuple(TEXTS))


def test_unknown_classifier_is_refused(pipeline):
    other = Pipeline([("features", pipeline[0]), ("clf", SGDClassifier())])
    with pytest.raises(UnsupportedPipelineError):
        compile_pipeline(other)


def test_a_wrong_scorer_is_detected(pipeline):
    wrong = compile_pipeline(pipeline)
    wrong.intercept = wrong.intercept + np.array([1e-3, 0.0, 0.0])
    assert max_difference(wrong, pipeline, PROBE_TEXTS) > VERIFY_TOLERANCE
