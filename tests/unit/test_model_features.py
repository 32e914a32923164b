"""Unit tests for text cleaning and the lexicon feature pass."""

import importlib
import pickle

import numpy as np
from tools import model_required, skip_or_fail

from falcon_svc.model.features import (
    LEXICON_FEATURE_NAMES,
    PLAIN_FEATURE_NAMES,
    LexiconFeatures,
    lexicon_features,
    preprocess,
    strip_noise,
)
from falcon_svc.model.vader import Lexicon, vader_scores
from falcon_svc.training.data import DataUnavailableError, load_vader_lexicon

VALENCES = {"good": 1.9, "bad": -2.5, "love": 3.2, ":)": 2.0}
NEGATIONS = frozenset({"not", "don't", "never"})
BOOSTERS = {"very": 0.293, "slightly": -0.293}
LEXICON = Lexicon(VALENCES, NEGATIONS, BOOSTERS)


def features(text: str) -> dict[str, float]:
    values = lexicon_features(text, LEXICON)
    return dict(zip(LEXICON_FEATURE_NAMES, values, strict=True))


def test_strip_noise_removes_handles_urls_retweets_and_entities():
    cleaned = strip_noise("RT @united: late again https://t.co/x &amp; www.example.com it\u2019s")
    assert "@united" not in cleaned and "http" not in cleaned and "www" not in cleaned
    assert "RT" not in cleaned.split()
    assert "&" in cleaned and "it's" in cleaned, cleaned


def test_preprocess_lowercases():
    assert preprocess("GOOD Flight @Delta") == "good flight  ", preprocess("GOOD Flight @Delta")


def test_plain_fact_has_no_sentiment():
    result = features("The package arrived on Tuesday.")
    assert result["no_sentiment"] == 1.0
    assert result["compound"] == 0.0


def test_negation_flips_polarity():
    assert features("not bad at all")["compound"] > 0, "'not bad' should read positive"
    assert features("I don't love it")["compound"] < 0, "'don't love' should read negative"


def test_negation_does_not_cross_a_clause():
    assert features("Not today. The food was good")["compound"] > 0


def test_booster_strengthens_and_dampener_weakens():
    plain = features("good")["compound"]
    assert features("very good")["compound"] > plain > features("slightly good")["compound"]


def test_but_shifts_weight_to_the_second_clause():
    assert features("It was bad but I love it")["compound"] > 0


def test_emoticon_is_looked_up_raw():
    assert features("see you :)")["positive"] > 0


def test_tweet_markers_are_flagged_and_plain_text_is_not():
    tweet = features("@united #fail http://t.co/x")
    assert (tweet["has_handle"], tweet["has_url"], tweet["has_hashtag"]) == (1.0, 1.0, 1.0)
    plain = features("The flight departs at 9 am.")
    assert (plain["has_handle"], plain["has_url"], plain["has_hashtag"]) == (0.0, 0.0, 0.0)


def test_transformer_calls_the_same_function():
    texts = ["not bad", "", "very good :)", "@x bad"]
    transformer = LexiconFeatures(VALENCES, NEGATIONS, BOOSTERS).fit(texts)
    expected = np.array([lexicon_features(t, LEXICON) for t in texts])
    np.testing.assert_array_equal(transformer.transform(texts), expected)
    assert transformer.transform([]).shape == (0, len(LEXICON_FEATURE_NAMES))


def test_plain_copies_repeat_the_vader_block_for_plain_text_only():
    plain = features("not bad at all")
    assert plain["plain"] == 1.0 and plain["plain_compound"] == plain["compound"] > 0
    tweet = features("@united not bad at all")
    assert all(tweet[name] == 0.0 for name in PLAIN_FEATURE_NAMES), tweet


def test_vader_decision_uses_the_documented_thresholds():
    assert features("good")["vader_positive"] == 1.0
    assert features("bad")["vader_negative"] == 1.0
    fact = features("The store opens at ten.")
    assert (fact["vader_positive"], fact["vader_negative"]) == (0.0, 0.0)


def test_fitted_lookups_pickle_the_same_whatever_the_input_order():
    # A set would pickle in hash order, and the artifact's sha256 would change per run.
    one = LexiconFeatures(VALENCES, ("not", "never", "don't"), BOOSTERS).fit([])
    two = LexiconFeatures(dict(reversed(VALENCES.items())), ("don't", "never", "not"), BOOSTERS).fit([])
    for name in ("valences_", "negations_", "boosters_", "emojis_"):
        assert pickle.dumps(getattr(one, name)) == pickle.dumps(getattr(two, name)), name


VADER_EXAMPLES = (
    "VADER is smart, handsome, and funny.",
    "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
    "VADER is not smart, handsome, nor funny.",
    "At least it isn't a horrible book.",
    "The book was only kind of good.",
    "The plot was good, but the characters are uncompelling and the dialog is not great.",
    "Today only kinda sux! But I'll get by, lol",
    "Catch utf-8 emoji such as \U0001f498 and \U0001f48b and \U0001f601",
    "Sentiment analysis has never been this good!",
    "With VADER, sentiment analysis is the shit!",
    "Roger Dodger is one of the least compelling variations on this theme.",
    "Without a doubt, excellent idea.",
    "Not such a badass after all.",
    "no problem, no no good",
    "Is this really that bad??? I don't think so.",
    "The package arrived on Tuesday.",
    "",
)


def test_vader_port_matches_vader_sentiment():
    try:
        analyzer_module = importlib.import_module("vaderSentiment.vaderSentiment")
        lexicon = load_vader_lexicon()
    except (ImportError, DataUnavailableError) as ex:
        skip_or_fail(f"vaderSentiment, the reference for our port, is unavailable: {ex}", required=model_required())
    fitted = LexiconFeatures(*lexicon).fit([])
    analyzer = analyzer_module.SentimentIntensityAnalyzer()
    for text in VADER_EXAMPLES:
        expected = analyzer.polarity_scores(text)
        compound, pos, neg, neu, _ = vader_scores(text, fitted.fitted_lexicon)
        ours = {"neg": round(neg, 3), "neu": round(neu, 3), "pos": round(pos, 3), "compound": round(compound, 4)}
        assert ours == expected, f"{text!r}: ours {ours} != VADER {expected}"
