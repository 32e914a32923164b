"""Normalisation: Stream-Safe, NFKC, whitespace collapsed, trimmed; and what bounds its CPU."""

import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from falcon_svc.text import MAX_NON_STARTERS, decomposition_tables, expanded_length, normalize, stream_safe


def test_nfkc_and_whitespace():
    assert normalize("  \uff28\uff45\uff4c\uff4c\uff4f\t\n wörld\u3000!  ") == "Hello wörld !"
    assert normalize("\ufb01ne") == "fine"


def test_blank_becomes_empty():
    assert normalize(" \n\t\u00a0\u2003") == ""


@given(st.text())
def test_idempotent_and_trimmed(text):
    once = normalize(text)
    assert normalize(once) == once
    assert once == once.strip()
    assert "  " not in once


# --- CPU bounds: Stream-Safe before NFKC, expansion counted before normalising ------------------

COMBINING_ACUTE, COMBINING_GRAVE_BELOW, CGJ = "\u0301", "\u0316", "\u034f"
# U+0F73 is a starter (class 0) that decomposes into two non-starters; U+1FAF ends in three.
TIBETAN_II, OMEGA_WITH_THREE_MARKS = "\u0f73", "\u1faf"


def longest_non_starter_run(text: str) -> int:
    """UAX #15's measure, computed here independently: the longest run of non-starters in the NFKD form."""
    longest = run = 0
    for char in unicodedata.normalize("NFKD", text):
        run = run + 1 if unicodedata.combining(char) else 0
        longest = max(longest, run)
    return longest


def test_the_stream_safe_guard_runs_before_nfkc(monkeypatch):
    """NFKC never sees more than 30 non-starters in a row: its canonical ordering is quadratic in a run."""
    original = unicodedata.normalize
    seen: list[str] = []

    def recording(form: str, text: str) -> str:
        seen.append(text)
        return original(form, text)

    monkeypatch.setattr(unicodedata, "normalize", recording)
    # The shape (marks in non-canonical order), and marks hidden inside starters.
    normalize("a" + COMBINING_ACUTE * 300 + COMBINING_GRAVE_BELOW * 299)
    normalize(TIBETAN_II * 200)
    monkeypatch.setattr(unicodedata, "normalize", original)
    assert len(seen) == 2, f"expected one NFKC per text, saw {len(seen)}"
    runs = [longest_non_starter_run(text) for text in seen]
    assert max(runs) <= MAX_NON_STARTERS, f"NFKC was handed runs of {runs} non-starters"


def test_a_long_run_gets_a_grapheme_joiner_after_every_30_non_starters():
    marks = COMBINING_ACUTE * 65
    assert stream_safe("a" + marks) == "a" + marks[:30] + CGJ + marks[30:60] + CGJ + marks[60:]
    assert normalize("a" + marks) == unicodedata.normalize(
        "NFKC", "a" + marks[:30] + CGJ + marks[30:60] + CGJ + marks[60:]
    )


def test_non_starters_are_counted_in_the_decomposed_form():
    # 16 x U+0F73 = 32 non-starters: the break comes after the 15th (30 non-starters).
    assert stream_safe(TIBETAN_II * 16) == TIBETAN_II * 15 + CGJ + TIBETAN_II
    # U+1FAF ends in 3 non-starters, so 27 more marks make 30 and the 28th needs a break.
    text = OMEGA_WITH_THREE_MARKS + COMBINING_ACUTE * 28
    assert stream_safe(text) == OMEGA_WITH_THREE_MARKS + COMBINING_ACUTE * 27 + CGJ + COMBINING_ACUTE


@pytest.mark.parametrize(
    "text",
    [
        "plain ASCII",
        "Très bien, à côté",
        "a" + COMBINING_ACUTE * 30,  # exactly 30: Stream-Safe already
        ("e" + COMBINING_ACUTE * 5 + COMBINING_GRAVE_BELOW * 5 + " ") * 50,  # decorated, in short runs
        "\U0001f600" * 40,  # astral, but no non-starters
    ],
)
def test_stream_safe_text_is_returned_as_it_is(text):
    assert stream_safe(text) == text


MARKED = st.text(
    alphabet=st.sampled_from(
        ["a", " ", COMBINING_ACUTE, COMBINING_GRAVE_BELOW, TIBETAN_II, OMEGA_WITH_THREE_MARKS, "\U0001d165", "\u00e9"]
    ),
    max_size=400,
)


@given(MARKED)
def test_stream_safe_only_adds_breaks_and_leaves_no_run_over_30(text):
    safe = stream_safe(text)
    assert safe.replace(CGJ, "") == text
    assert longest_non_starter_run(safe) <= MAX_NON_STARTERS
    # A break only where one is needed: without it the run would pass 30.
    for index, char in enumerate(safe):
        if char == CGJ:
            assert longest_non_starter_run(safe[:index].rsplit(CGJ, 1)[-1] + safe[index + 1 :].split(CGJ, 1)[0]) > 30


@given(st.text(max_size=200) | MARKED)
def test_nfkc_writes_at_most_twice_the_expanded_length(text):
    assert len(unicodedata.normalize("NFKC", text)) <= 2 * expanded_length(text)


def test_characters_that_nfkd_more_than_doubles_count_at_their_decomposed_length():
    assert expanded_length("abc") == 3
    assert expanded_length("\u00e9") == 1, "e + U+0301 is only twice as long"
    assert expanded_length("\u2474") == 3, "(1)"
    assert expanded_length("x\ufdfa") == 19, "U+FDFA is 18 characters under NFKD"


def test_the_tables_cover_every_code_point_of_this_pythons_unicode():
    """The NOTE in text.py: decompositions and combining classes all lie in planes 0 and 1."""
    assert decomposition_tables(sys.maxunicode) == decomposition_tables()
