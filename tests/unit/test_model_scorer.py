"""The compiled scorer must equal the pipeline's predict_proba to 1e-9."""

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.special
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import FunctionTransformer

from falcon_svc.model.scorer import (
    PROBE_TEXTS,
    VERIFY_TOLERANCE,
    UnsupportedPipelineError,
    compile_pipeline,
    max_difference,
)
from falcon_svc.text import normalize
from falcon_svc.training.dummy import (
    DUMMY_LEXICON,
    DUMMY_NEGATIONS,
    DUMMY_SENTENCES,
    DUMMY_VALENCES,
)
from falcon_svc.training.training import TrainingConfig, build_pipeline, fit_pipeline

TEXTS = [text for _, text in DUMMY_SENTENCES]
LABELS = [label for label, _ in DUMMY_SENTENCES]


def small_pipeline(labels=LABELS, texts=TEXTS, **config) -> Pipeline:
    """Fit the production pipeline shape on the embedded sentences (milliseconds)."""
    cfg = replace(TrainingConfig(), min_df=1, **config)
    return fit_pipeline(texts, labels, DUMMY_LEXICON, cfg, virtual_documents=False)


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


# --- Found by mutation testing (`make mutation`, docs/TESTING.md) ---------------------


def pipeline_with(**vectorizer_params) -> Pipeline:
    """The production shape, with TfidfVectorizer settings production does not use (yet)."""
    pipeline = build_pipeline(DUMMY_LEXICON, replace(TrainingConfig(), min_df=1))
    pipeline.set_params(**{f"features__tfidf__{name}": value for name, value in vectorizer_params.items()})
    return pipeline.fit(TEXTS, LABELS)


@pytest.mark.parametrize(
    "params",
    [{"binary": True}, {"use_idf": False}, {"norm": None}, {"sublinear_tf": False}],
    ids=["binary", "no-idf", "no-norm", "linear-tf"],
)
def test_every_vectorizer_setting_the_compiler_accepts_is_compiled_exactly(params):
    pipeline = pipeline_with(**params)
    assert_matches(compile_pipeline(pipeline), pipeline, PROBE_TEXTS + tuple(TEXTS))


@pytest.mark.parametrize(
    "weights", [{"tfidf": 0.7, "lexicon": 2.5}, {"tfidf": 0.7}], ids=["both", "lexicon-defaults-to-one"]
)
def test_transformer_weights_are_applied_to_each_block(weights):
    pipeline = copy.deepcopy(small_pipeline())
    pipeline.named_steps["features"].transformer_weights = weights
    assert_matches(compile_pipeline(pipeline), pipeline, PROBE_TEXTS + tuple(TEXTS))


def test_softmax_is_stable_for_scores_in_the_thousands(pipeline):
    compiled = compile_pipeline(pipeline)
    column = compiled.vocabulary["love"]
    compiled.tfidf_coef_t = compiled.tfidf_coef_t.copy()
    compiled.tfidf_coef_t[column, 0] = 1e4
    texts = ["I love this", "The package arrived on Tuesday."]
    scores = compiled.decision(texts)
    assert scores[0].max() > 1000 > scores[1].max(), "one extreme row and one ordinary row"
    probabilities = compiled.predict_proba(texts)
    assert np.all(np.isfinite(probabilities)), f"overflow: {probabilities}"
    np.testing.assert_allclose(probabilities, scipy.special.softmax(scores, axis=1), rtol=1e-12)


def test_empty_batch_of_a_binary_model_has_two_columns():
    keep = [i for i, label in enumerate(LABELS) if label != "neutral"]
    binary = compile_pipeline(small_pipeline([LABELS[i] for i in keep], [TEXTS[i] for i in keep]))
    assert binary.predict_proba([]).shape == (0, 2)


def refusal(pipeline: Pipeline) -> str:
    with pytest.raises(UnsupportedPipelineError) as info:
        compile_pipeline(pipeline)
    return str(info.value)


def test_each_unsupported_shape_is_refused_with_its_reason(pipeline):
    union, classifier = pipeline.named_steps["features"], pipeline.named_steps["clf"]
    tfidf, lexicon = (step for _, step in union.transformer_list)
    shape = "expected Pipeline([FeatureUnion, LogisticRegression])"
    assert refusal(Pipeline([("f", union), ("x", FunctionTransformer()), ("clf", classifier)])) == shape
    assert refusal(Pipeline([("tfidf", TfidfVectorizer()), ("clf", classifier)])) == shape
    assert refusal(Pipeline([("f", union), ("clf", SGDClassifier())])) == "unsupported classifier SGDClassifier"
    other_union = FeatureUnion([("tfidf", TfidfVectorizer()), ("counts", CountVectorizer())])
    assert refusal(Pipeline([("f", other_union), ("clf", classifier)])) == (
        "expected exactly a TfidfVectorizer and LexiconFeatures"
    )
    swapped = FeatureUnion([("lexicon", lexicon), ("tfidf", tfidf)])
    assert refusal(Pipeline([("f", swapped), ("clf", classifier)])) == (
        "expected the TfidfVectorizer before LexiconFeatures"
    )


@pytest.mark.parametrize("params", [{"norm": "l1"}, {"dtype": np.float32}], ids=["l1-norm", "float32"])
def test_other_tfidf_arithmetic_is_refused(pipeline, params):
    other = copy.deepcopy(pipeline)
    other.named_steps["features"].transformer_list[0][1].set_params(**params)
    assert refusal(other) == "only float64 TF-IDF with l2 or no norm is supported"


def test_a_classifier_of_another_width_is_refused(pipeline):
    other = copy.deepcopy(pipeline)
    other.named_steps["clf"].coef_ = other.named_steps["clf"].coef_[:, :-1]
    assert refusal(other) == "classifier width does not match the features"


class FixedScorer:
    """A scorer of our own interface that answers what it is told: batches and single texts apart."""

    def __init__(self, batch: np.ndarray, single: np.ndarray) -> None:
        self._batch, self._single = batch, single

    def predict_proba(self, texts):
        return self._batch if len(texts) > 1 else self._single


def test_verification_fails_a_scorer_that_answers_nan(pipeline):
    texts = list(PROBE_TEXTS[:3])
    expected = pipeline.predict_proba(texts)
    nan = np.full_like(expected, np.nan)
    assert max_difference(FixedScorer(nan, nan[:1]), pipeline, texts) == math.inf, "NaN must never pass as close"


def test_verification_fails_a_scorer_whose_batches_have_the_wrong_shape(pipeline):
    texts = list(PROBE_TEXTS[:3])
    expected = pipeline.predict_proba(texts)
    control = FixedScorer(expected, expected[:1])
    assert math.isfinite(max_difference(control, pipeline, texts)), "control: the right shapes give a finite answer"
    assert max_difference(FixedScorer(expected[:2], expected[:1]), pipeline, texts) == math.inf
