"""Turn text into model features: noise stripping and the lexicon feature block.

The TF-IDF block learns from tweets; the lexicon block carries what tweets teach
badly (that "flight" or "package" is not negative, that "not bad" is fine). It
starts from VADER's scores (vader.py, a faithful port of VADER's rules) and adds
tweet markers and plain-text copies. Both the scikit-learn transformer and the
compiled scorer call :func:`lexicon_features`, so training and serving cannot
drift apart.

NOTE: fitted pipelines pickle ``preprocess`` and ``LexiconFeatures`` by their
import path (falcon_svc.model.features); moving either breaks every artifact
unless artifact.FORMAT_VERSION is bumped and the model retrained.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from falcon_svc.model.vader import VADER_THRESHOLD, Lexicon, vader_scores

# The VADER block, then the same decisions gated to plain text (no handle, URL or
# hashtag). Tweets and plain sentences disagree on how far a lexicon word decides
# the label (VADER scores 0.46 macro-F1 on the tweets, about 0.8-0.9 on sentences);
# the gated copies let the plain-sentence training data set its own weights
# ("frustratingly easy" domain adaptation, Daume 2007) instead of a compromise.
VADER_FEATURE_NAMES = (
    "compound",
    "positive",
    "negative",
    "no_sentiment",
    "vader_positive",
    "vader_negative",
)
MARKER_FEATURE_NAMES = ("has_handle", "has_url", "has_hashtag")
PLAIN_FEATURE_NAMES = ("plain", *(f"plain_{name}" for name in VADER_FEATURE_NAMES))
LEXICON_FEATURE_NAMES = VADER_FEATURE_NAMES + MARKER_FEATURE_NAMES + PLAIN_FEATURE_NAMES

_HANDLE = re.compile(r"(?<!\w)@\w+")
_URL = re.compile(r"(?:https?://|www\.)\S*", re.IGNORECASE)
_RETWEET = re.compile(r"(?<!\w)RT(?!\w)")
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'"}
_ENTITY = re.compile("|".join(map(re.escape, _ENTITIES)))
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def strip_noise(text: str) -> str:
    """Remove handles, URLs, retweet markers and HTML entities; keep case.

    Handles are brand names in this corpus ("@united"), so keeping them would teach
    the model that mentioning a company is a complaint.
    """
    text = _URL.sub(" ", text)
    text = _HANDLE.sub(" ", text)
    text = _RETWEET.sub(" ", text)
    text = _ENTITY.sub(lambda match: _ENTITIES[match.group(0)], text)
    return text.translate(_APOSTROPHES)


def preprocess(text: str) -> str:
    """Strip noise and lower-case: the TF-IDF vectorizer's preprocessor.

    scikit-learn skips its own lower-casing when a preprocessor is given, so this
    function does it.
    """
    return strip_noise(text).lower()


def lexicon_features(text: str, lexicon: Lexicon) -> tuple[float, ...]:
    """Score ``text`` with VADER's rules; return the values named by LEXICON_FEATURE_NAMES.

    compound/positive/negative are VADER's scores; no_sentiment is 1.0 when no
    word carries a valence (the signal that a plain statement of fact is
    neutral); vader_positive/vader_negative are VADER's own decision (rounded
    compound >= VADER_THRESHOLD / <= -VADER_THRESHOLD) as steps. has_handle/has_url/has_hashtag mark
    tweet-shaped text, so the corpus's base rates (airline tweets are 63%
    complaints) land on the markers, not on words like "flight". The plain_*
    copies are the VADER block again for text with none of the markers, and 0
    for tweets.
    """
    compound, positive, negative, _, scored = vader_scores(text, lexicon)
    rounded = round(compound, 4)
    vader = (
        compound,
        positive,
        negative,
        0.0 if scored else 1.0,
        1.0 if rounded >= VADER_THRESHOLD else 0.0,
        1.0 if rounded <= -VADER_THRESHOLD else 0.0,
    )
    markers = (
        1.0 if "@" in text and _HANDLE.search(text) else 0.0,
        1.0 if _URL.search(text) else 0.0,
        1.0 if "#" in text else 0.0,
    )
    if any(markers):
        return vader + markers + (0.0,) * len(PLAIN_FEATURE_NAMES)
    return vader + markers + (1.0,) + vader


# scikit-learn ships no type information, so its base classes are Any to mypy.
class LexiconFeatures(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Compute :func:`lexicon_features` for each text; the lexicon is a parameter.

    The lexicon is stored inside the fitted pipeline so serving never needs the
    package it came from. The fitted lookups are plain dicts built from sorted
    keys: a set would pickle in hash order and change the artifact's sha256 from
    one run to the next.
    """

    def __init__(
        self,
        valences: Mapping[str, float] | None = None,
        negations: Iterable[str] = (),
        boosters: Mapping[str, float] | None = None,
        emojis: Mapping[str, str] | None = None,
    ) -> None:
        self.valences = valences
        self.negations = negations
        self.boosters = boosters
        self.emojis = emojis

    def fit(self, texts: Iterable[str], y: object = None) -> LexiconFeatures:
        """Freeze the lexicon into lookup structures; the texts are not needed."""
        self.valences_ = dict(sorted((self.valences or {}).items()))
        self.negations_ = dict.fromkeys(sorted(set(self.negations)), True)
        self.boosters_ = dict(sorted((self.boosters or {}).items()))
        self.emojis_ = dict(sorted((self.emojis or {}).items()))
        self.n_features_out_ = len(LEXICON_FEATURE_NAMES)
        return self

    @property
    def fitted_lexicon(self) -> Lexicon:
        """Return the frozen lookups that :meth:`fit` built.

        NOTE: built on each call rather than stored by fit(): the fitted attributes
        are what artifacts pickle, and old artifacts must load unchanged.
        """
        return Lexicon(self.valences_, self.negations_, self.boosters_, self.emojis_)

    def row(self, text: str) -> tuple[float, ...]:
        """Return the feature values of one text."""
        return lexicon_features(text, self.fitted_lexicon)

    def transform(self, texts: Iterable[str]) -> np.ndarray:
        """Return one row of lexicon features per text (float64)."""
        rows = [self.row(text) for text in texts]
        return np.array(rows, dtype=np.float64).reshape(-1, self.n_features_out_)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """Name the columns, for inspection of the fitted coefficients."""
        return np.array(LEXICON_FEATURE_NAMES, dtype=object)
