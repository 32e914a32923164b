"""Score texts fast: compile the fitted pipeline into plain dicts and numpy arrays.

scikit-learn's ``predict_proba`` on one text costs about a millisecond, mostly input
validation and sparse-matrix bookkeeping. The compiled scorer does the same
arithmetic (the vectorizer's own analyzer, idf, sublinear tf, L2 norm, the lexicon
pass, one matmul, softmax) without that overhead. It is verified against the
pipeline at load time; anything it does not understand is refused, and the caller
falls back to scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from falcon_svc.model.features import LexiconFeatures

VERIFY_TOLERANCE = 1e-9

# Probe texts for verification: edge cases (empty, no known words, unicode, noise
# the cleaner strips) as well as ordinary sentences of every class.
PROBE_TEXTS = (
    "",
    " ",
    "!!!",
    "?",
    "zzzz qqqq xxyyzz",
    "The package arrived on Tuesday.",
    "The flight departs at 9 am from gate 12.",
    "I love this phone, the camera is amazing!",
    "Terrible service, I waited two hours and nobody helped.",
    "not bad at all",
    "I don't love it",
    "It's not perfect, but I really like it.",
    "very very very good good good!!!",
    "@united thanks for nothing http://t.co/abc #fail",
    "RT @someone: this is &amp; was great :) :-(",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e was d\u00e9licieux \U0001f600",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "It\u2019s not good, it\u2019s great.",
    "ok " * 200,
)


Floats = npt.NDArray[np.float64]
Indices = npt.NDArray[np.intp]


class Scorer(Protocol):
    """Anything that turns texts into class probabilities (rows in label order)."""

    def predict_proba(self, texts: Sequence[str]) -> Floats: ...


class UnsupportedPipelineError(Exception):
    """Raised when a pipeline has a shape the compiler does not know."""


class SklearnScorer:
    """Score with the pipeline itself: the reference, and the fallback."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def predict_proba(self, texts: Sequence[str]) -> Floats:
        """Return ``pipeline.predict_proba`` for ``texts``."""
        return np.asarray(self.pipeline.predict_proba(list(texts)), dtype=np.float64)


class CompiledScorer:
    """A TF-IDF + lexicon + linear model scorer in plain Python and numpy.

    Attributes are public so tests can build a deliberately wrong scorer and
    check that verification catches it.
    """

    def __init__(
        self,
        *,
        analyzer: Callable[[str], list[str]],
        vocabulary: dict[str, int],
        idf: Floats | None,
        sublinear_tf: bool,
        binary: bool,
        normalize: bool,
        tfidf_weight: float,
        lexicon: LexiconFeatures,
        lexicon_weight: float,
        tfidf_coef: Floats,
        lexicon_coef: Floats,
        intercept: Floats,
        binary_classes: bool,
    ) -> None:
        self.analyzer = analyzer
        self.vocabulary = vocabulary
        self.idf = idf
        self.sublinear_tf = sublinear_tf
        self.binary = binary
        self.normalize = normalize
        self.tfidf_weight = tfidf_weight
        self.lexicon = lexicon
        self.lexicon_weight = lexicon_weight
        self.tfidf_coef_t = np.ascontiguousarray(tfidf_coef.T)  # (n_terms, n_outputs)
        self.lexicon_coef_t = np.ascontiguousarray(lexicon_coef.T)  # (n_lexicon, n_outputs)
        self.intercept = intercept
        self.binary_classes = binary_classes

    def _terms(self, text: str) -> tuple[Indices, Floats]:
        """Return (column indices, tf-idf values) of ``text``, unweighted."""
        counts: dict[int, int] = {}
        vocabulary = self.vocabulary
        for token in self.analyzer(text):
            column = vocabulary.get(token)
            if column is not None:
                counts[column] = counts.get(column, 0) + 1
        columns = np.fromiter(counts, dtype=np.intp, count=len(counts))
        if self.binary:
            values = np.ones(len(counts), dtype=np.float64)
        else:
            values = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            if self.sublinear_tf:
                values = np.log(values) + 1.0
        if self.idf is not None:
            values *= self.idf[columns]
        if self.normalize and len(values):
            norm = math.sqrt(float(values @ values))
            if norm:
                values /= norm
        return columns, values

    def _lexicon_row(self, text: str) -> tuple[float, ...]:
        return self.lexicon.row(text)

    def _decision_one(self, text: str) -> Floats:
        """Return the raw scores of one text, shape (1, n_outputs).

        Gathers the coefficient rows directly: building a sparse matrix for one text
        would cost more than the arithmetic.
        """
        columns, values = self._terms(text)
        lexicon = np.array(self._lexicon_row(text), dtype=np.float64)
        scores = (values * self.tfidf_weight) @ self.tfidf_coef_t[columns]
        scores = scores + (lexicon * self.lexicon_weight) @ self.lexicon_coef_t
        return (scores + self.intercept)[np.newaxis, :]

    def decision(self, texts: Sequence[str]) -> Floats:
        """Return the linear model's raw scores, shape (n_texts, n_outputs)."""
        if len(texts) == 1:
            return self._decision_one(texts[0])
        indptr = [0]
        all_columns: list[Indices] = []
        all_values: list[Floats] = []
        lexicon_rows = []
        for text in texts:
            columns, values = self._terms(text)
            all_columns.append(columns)
            all_values.append(values)
            indptr.append(indptr[-1] + len(columns))
            lexicon_rows.append(self._lexicon_row(text))
        matrix = sp.csr_array(
            (
                np.concatenate(all_values) * self.tfidf_weight if all_values else np.zeros(0),
                np.concatenate(all_columns) if all_columns else np.zeros(0, dtype=np.intp),
                np.array(indptr, dtype=np.intp),
            ),
            shape=(len(texts), self.tfidf_coef_t.shape[0]),
        )
        lexicon = np.array(lexicon_rows, dtype=np.float64).reshape(len(texts), -1)
        # sparse @ dense is a dense float64 array; asarray (no copy) says so to the type checker.
        scores = np.asarray(matrix @ self.tfidf_coef_t, dtype=np.float64)
        scores += (lexicon * self.lexicon_weight) @ self.lexicon_coef_t
        return scores + self.intercept

    def predict_proba(self, texts: Sequence[str]) -> Floats:
        """Return class probabilities the way LogisticRegression.predict_proba does."""
        if not len(texts):
            return np.zeros((0, 2 if self.binary_classes else self.intercept.shape[0]))
        scores = self.decision(texts)
        if self.binary_classes:
            positive = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            return np.column_stack([1.0 - positive, positive])
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return scores


def compile_pipeline(pipeline: Pipeline) -> CompiledScorer:
    """Compile Pipeline([FeatureUnion([TfidfVectorizer, LexiconFeatures]), LogisticRegression]).

    Raise UnsupportedPipelineError for any other shape or setting, rather than
    guess: verification would catch a wrong guess, but a clear reason is better.
    """
    steps = [step for _, step in pipeline.steps]
    if len(steps) != 2 or not isinstance(steps[0], FeatureUnion):
        raise UnsupportedPipelineError("expected Pipeline([FeatureUnion, LogisticRegression])")
    union, classifier = steps
    if type(classifier) is not LogisticRegression:
        raise UnsupportedPipelineError(f"unsupported classifier {type(classifier).__name__}")
    weights = union.transformer_weights or {}
    parts = {}
    for name, transformer in union.transformer_list:
        parts[type(transformer)] = (transformer, float(weights.get(name, 1.0)))
    if len(parts) != 2 or set(parts) != {TfidfVectorizer, LexiconFeatures}:
        raise UnsupportedPipelineError("expected exactly a TfidfVectorizer and LexiconFeatures")
    if [type(t) for _, t in union.transformer_list] != [TfidfVectorizer, LexiconFeatures]:
        raise UnsupportedPipelineError("expected the TfidfVectorizer before LexiconFeatures")
    vectorizer, tfidf_weight = parts[TfidfVectorizer]
    lexicon, lexicon_weight = parts[LexiconFeatures]
    if vectorizer.norm not in ("l2", None) or vectorizer.dtype is not np.float64:
        raise UnsupportedPipelineError("only float64 TF-IDF with l2 or no norm is supported")
    n_terms = len(vectorizer.vocabulary_)
    coef = np.asarray(classifier.coef_, dtype=np.float64)
    if coef.shape[1] != n_terms + lexicon.n_features_out_:
        raise UnsupportedPipelineError("classifier width does not match the features")
    return CompiledScorer(
        analyzer=vectorizer.build_analyzer(),
        vocabulary=dict(vectorizer.vocabulary_),
        idf=np.asarray(vectorizer.idf_, dtype=np.float64) if vectorizer.use_idf else None,
        sublinear_tf=bool(vectorizer.sublinear_tf),
        binary=bool(vectorizer.binary),
        normalize=vectorizer.norm == "l2",
        tfidf_weight=tfidf_weight,
        lexicon=lexicon,
        lexicon_weight=lexicon_weight,
        tfidf_coef=coef[:, :n_terms],
        lexicon_coef=coef[:, n_terms:],
        intercept=np.asarray(classifier.intercept_, dtype=np.float64),
        binary_classes=len(classifier.classes_) == 2,
    )


def max_difference(scorer: Scorer, pipeline: Pipeline, texts: Sequence[str]) -> float:
    """Return the largest |difference| between ``scorer`` and the pipeline on ``texts``.

    Check the batch path and the one-text path, since they are different code.
    """
    expected = np.asarray(pipeline.predict_proba(list(texts)), dtype=np.float64)
    batch = scorer.predict_proba(list(texts))
    singles = np.vstack([scorer.predict_proba([text]) for text in texts])
    if batch.shape != expected.shape or singles.shape != expected.shape:
        return math.inf
    worst = max(float(np.max(np.abs(batch - expected))), float(np.max(np.abs(singles - expected))))
    return worst if math.isfinite(worst) else math.inf
