"""Score text with VADER's rules: a port of vaderSentiment 3.3.2 (MIT licence).

VADER (Hutto & Gilbert 2014) sums lexicon valences adjusted for negation, boosters,
"but", ALL-CAPS, idioms and punctuation, then squashes the sum into a ``compound``
score in [-1, 1]. This port does the same arithmetic, unrounded and in one pass over
the words, so its compound equals VADER's (tests check it against the real package)
while serving never imports vaderSentiment: the lexicon tables are handed in as a
:class:`Lexicon`, and the fitted pipeline carries them (features.LexiconFeatures).

Where a helper ports one of VADER's functions its docstring names it
(scalar_inc_dec, sentiment_valence), so a reader can lay this file beside the
original.
"""

from __future__ import annotations

import math
import string
from collections.abc import Collection, Container, Mapping, Sequence
from typing import NamedTuple

# Constants from VADER, so our valences mean what theirs do.
NEGATION_SCALAR = -0.74
CAPS_INCREMENT = 0.733
# VADER's documented decision: compound >= +threshold is positive, <= -threshold
# negative, anything between neutral. The one place this number is written.
VADER_THRESHOLD = 0.05
_BOOSTER_DECAY = (1.0, 0.95, 0.9)
_BUT_BEFORE, _BUT_AFTER = 0.5, 1.5
_EXCLAMATION_BOOST, _MAX_EXCLAMATIONS = 0.292, 4
_QUESTION_BOOST, _MAX_QUESTION_AMPLIFIER = 0.18, 0.96
_SQUASH_ALPHA = 15.0
# VADER's idioms that override the valence of a lexicon word they contain.
SPECIAL_CASES = {
    "the shit": 3.0,
    "the bomb": 3.0,
    "bad ass": 1.5,
    "badass": 1.5,
    "bus stop": 0.0,
    "yeah right": -2.0,
    "kiss of death": -1.5,
    "to die for": 3.0,
    "beating heart": 3.5,
}
_PUNCTUATION = string.punctuation
_EMPTY: Mapping[str, str] = {}


class Lexicon(NamedTuple):
    """VADER's tables: word valences, negation words, boosters/dampeners, emoji descriptions.

    Serving hands in plain dicts (membership tests are hot); training may hand in any
    container of negations, which LexiconFeatures turns into a dict when it fits.
    """

    valences: Mapping[str, float]
    negations: Collection[str]
    boosters: Mapping[str, float]
    emojis: Mapping[str, str] = _EMPTY


def _squash(score: float) -> float:
    """Map an unbounded valence sum into [-1, 1] the way VADER's compound does."""
    return max(-1.0, min(1.0, score / math.sqrt(score * score + _SQUASH_ALPHA)))


def _describe_emojis(text: str, emojis: Mapping[str, str]) -> str:
    """Replace each emoji with its description, spaced as VADER does."""
    if text.isascii() or not emojis:
        return text
    parts: list[str] = []
    prev_space = True
    for char in text:
        description = emojis.get(char)
        if description is not None:
            if not prev_space:
                parts.append(" ")
            parts.append(description)
            prev_space = False
        else:
            parts.append(char)
            prev_space = char == " "
    return "".join(parts)


def _token(raw: str) -> str:
    """Strip surrounding punctuation unless that leaves two characters or fewer (an emoticon)."""
    stripped = raw.strip(_PUNCTUATION)
    return raw if len(stripped) <= 2 else stripped


def _is_negation(word: str, negations: Container[str]) -> bool:
    return word in negations or "n't" in word


def _booster(word: str, lower: str, valence: float, cap_diff: bool, boosters: Mapping[str, float]) -> float:
    """Return what a preceding booster/dampener adds to ``valence`` (VADER's scalar_inc_dec)."""
    scalar = boosters.get(lower)
    if scalar is None:
        return 0.0
    if valence < 0:
        scalar = -scalar
    if cap_diff and word.isupper():
        scalar += CAPS_INCREMENT if valence > 0 else -CAPS_INCREMENT
    return scalar


def _negation(valence: float, lower: Sequence[str], back: int, i: int, negations: Container[str]) -> float:
    """Apply VADER's negation rules for the word ``back + 1`` places before ``i``."""
    if back == 0:
        if _is_negation(lower[i - 1], negations):
            valence *= NEGATION_SCALAR
    elif back == 1:
        if lower[i - 2] == "never" and lower[i - 1] in ("so", "this"):
            valence *= 1.25
        elif lower[i - 2] == "without" and lower[i - 1] == "doubt":
            pass
        elif _is_negation(lower[i - 2], negations):
            valence *= NEGATION_SCALAR
    # NOTE: VADER's precedence, kept on purpose: three words back, "so"/"this" right
    # before the word boosts it even without a "never".
    elif (lower[i - 3] == "never" and lower[i - 2] in ("so", "this")) or lower[i - 1] in ("so", "this"):
        valence *= 1.25
    elif lower[i - 3] == "without" and (lower[i - 2] == "doubt" or lower[i - 1] == "doubt"):
        pass
    elif _is_negation(lower[i - 3], negations):
        valence *= NEGATION_SCALAR
    return valence


def _idioms(valence: float, lower: Sequence[str], i: int, boosters: Mapping[str, float]) -> float:
    """Apply VADER's special-case idioms and two-word dampeners ("kind of") around ``i``."""
    one_zero = f"{lower[i - 1]} {lower[i]}"
    two_one_zero = f"{lower[i - 2]} {lower[i - 1]} {lower[i]}"
    two_one = f"{lower[i - 2]} {lower[i - 1]}"
    three_two_one = f"{lower[i - 3]} {lower[i - 2]} {lower[i - 1]}"
    three_two = f"{lower[i - 3]} {lower[i - 2]}"
    for sequence in (one_zero, two_one_zero, two_one, three_two_one, three_two):
        if sequence in SPECIAL_CASES:
            valence = SPECIAL_CASES[sequence]
            break
    if len(lower) - 1 > i:
        zero_one = f"{lower[i]} {lower[i + 1]}"
        if zero_one in SPECIAL_CASES:
            valence = SPECIAL_CASES[zero_one]
    if len(lower) - 1 > i + 1:
        zero_one_two = f"{lower[i]} {lower[i + 1]} {lower[i + 2]}"
        if zero_one_two in SPECIAL_CASES:
            valence = SPECIAL_CASES[zero_one_two]
    for sequence in (three_two_one, three_two, two_one):
        if sequence in boosters:
            valence += boosters[sequence]
    return valence


def _word_valence(i: int, words: Sequence[str], lower: Sequence[str], cap_diff: bool, lexicon: Lexicon) -> float:
    """Return the valence of word ``i`` in context (VADER's sentiment_valence)."""
    valences, negations, boosters, _ = lexicon
    word = lower[i]
    base = valences[word]
    valence = base
    last = len(words) - 1
    if word == "no" and i != last and lower[i + 1] in valences:
        valence = 0.0
    if (
        (i > 0 and lower[i - 1] == "no")
        or (i > 1 and lower[i - 2] == "no")
        or (i > 2 and lower[i - 3] == "no" and lower[i - 1] in ("or", "nor"))
    ):
        valence = base * NEGATION_SCALAR
    if cap_diff and words[i].isupper():
        valence += CAPS_INCREMENT if valence > 0 else -CAPS_INCREMENT
    for back in range(3):
        j = i - back - 1
        if j >= 0 and lower[j] not in valences:
            scalar = _booster(words[j], lower[j], valence, cap_diff, boosters)
            if scalar:
                valence += scalar * _BOOSTER_DECAY[back]
            valence = _negation(valence, lower, back, i, negations)
            if back == 2:
                valence = _idioms(valence, lower, i, boosters)
    # "least" negates, except in "at least" and "very least".
    if i > 0 and lower[i - 1] == "least" and "least" not in valences and (i == 1 or lower[i - 2] not in ("at", "very")):
        valence *= NEGATION_SCALAR
    return valence


def _but_check(lower: list[str], sentiments: list[float]) -> None:
    """Halve what precedes the first "but" and raise what follows by half, in place.

    NOTE: a literal copy of VADER's loop, including its quirk of finding each
    value by equality (list.index), so our compound stays equal to VADER's.
    """
    if "but" not in lower:
        return
    but_at = lower.index("but")
    for sentiment in sentiments:
        at = sentiments.index(sentiment)
        if at < but_at:
            sentiments.pop(at)
            sentiments.insert(at, sentiment * _BUT_BEFORE)
        elif at > but_at:
            sentiments.pop(at)
            sentiments.insert(at, sentiment * _BUT_AFTER)


def _punctuation_emphasis(text: str) -> float:
    exclamations = min(text.count("!"), _MAX_EXCLAMATIONS) * _EXCLAMATION_BOOST
    questions = text.count("?")
    if questions <= 1:
        return exclamations
    return exclamations + (questions * _QUESTION_BOOST if questions <= 3 else _MAX_QUESTION_AMPLIFIER)


def vader_scores(text: str, lexicon: Lexicon) -> tuple[float, float, float, float, bool]:
    """Return VADER's (compound, pos, neg, neu) for ``text`` and whether any word scored.

    The same arithmetic as vaderSentiment's polarity_scores, unrounded, in one
    pass over the words; tests check it against the real thing.
    """
    valences, _, boosters, emojis = lexicon
    text = _describe_emojis(text, emojis).strip()
    words = [_token(raw) for raw in text.split()]
    lower = [word.lower() for word in words]
    hits = [
        i
        for i, word in enumerate(lower)
        if word in valences and word not in boosters and not (word == "kind" and lower[i + 1 : i + 2] == ["of"])
    ]
    if not hits:
        # NOTE: the common case for statements of fact; VADER's arithmetic gives the same.
        return 0.0, 0.0, 0.0, 1.0 if words else 0.0, False
    caps = sum(1 for word in words if word.isupper())
    cap_diff = 0 < len(words) - caps < len(words)
    sentiments = [0.0] * len(words)
    for i in hits:
        sentiments[i] = _word_valence(i, words, lower, cap_diff, lexicon)
    _but_check(lower, sentiments)
    total = sum(sentiments)
    emphasis = _punctuation_emphasis(text)
    if total > 0:
        total += emphasis
    elif total < 0:
        total -= emphasis
    pos_sum = sum(s + 1.0 for s in sentiments if s > 0)
    neg_sum = sum(s - 1.0 for s in sentiments if s < 0)
    neutral = sum(1 for s in sentiments if s == 0)
    if pos_sum > -neg_sum:
        pos_sum += emphasis
    elif pos_sum < -neg_sum:
        neg_sum -= emphasis
    denominator = pos_sum - neg_sum + neutral
    return (
        _squash(total),
        abs(pos_sum / denominator),
        abs(neg_sum / denominator),
        abs(neutral / denominator),
        neutral < len(sentiments),
    )
