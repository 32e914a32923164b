"""Normalise input text: the one place that decides what the model and cache see.

Normalising must cost little CPU for any text the size limits accept, not only
for the texts people write (docs/SECURITY.md). Two things bound it:

- ``normalize`` first puts the text in UAX #15's Stream-Safe Text Format (no
  more than 30 non-starters in a row). CPython's NFKC sorts combining marks by
  insertion sort, quadratic in a run's length: "a" + 10,000 U+0301 + 9,999
  U+0316 cost 0.65 s of CPU, 20,000 U+0F73 (a starter that decomposes into two
  marks) 1.3 s. With runs of at most 30 the sort is linear.
- ``expanded_length`` is what callers bound before normalising: the length,
  with each character NFKD lengthens more than twofold (U+FDFA: 18) counted at
  its decomposed length, so NFKC never writes more than twice the bound.

Both are cheap on the texts people send: ASCII is skipped in O(1), other text
costs one regular-expression scan each (about 10 ns a character).
"""

import re
import unicodedata
from collections.abc import Iterable

MAX_TEXT_CHARS = 5000

# UAX #15, section 13: the longest run of non-starters (characters of canonical
# combining class other than 0) a Stream-Safe text holds, and the character that
# breaks a longer one: U+034F COMBINING GRAPHEME JOINER, invisible, a starter to
# canonical ordering, and kept by NFKC.
MAX_NON_STARTERS = 30
STREAM_SAFE_BREAK = "\u034f"
# ``expanded_length`` counts a character at its NFKD length above this many.
EXPANSION_COUNTED_ABOVE = 2
# NOTE: planes 0 and 1 only (about 15 ms at import, against 200 ms for all 17):
# every decomposition and non-zero combining class lies there; tests/unit/test_text.py
# checks it against the whole range of the running Python's Unicode.
_LAST_CODE_POINT = 0x1FFFF

NonStarters = tuple[int, int, bool]


def decomposition_tables(last_code_point: int = _LAST_CODE_POINT) -> tuple[dict[str, NonStarters], dict[str, int]]:
    """Return what NFKD does to the characters up to ``last_code_point``: non-starters and long expansions.

    The first table maps each character whose NFKD holds a non-starter to
    (leading non-starters, trailing non-starters, whether there is nothing
    else); the second maps each character whose NFKD is longer than
    ``EXPANSION_COUNTED_ABOVE`` to that length.
    """
    non_starters: dict[str, NonStarters] = {}
    expansions: dict[str, int] = {}
    candidates = [
        char
        for char in map(chr, range(last_code_point + 1))
        if unicodedata.combining(char) or unicodedata.decomposition(char)
    ]
    for char in candidates:
        decomposed = unicodedata.normalize("NFKD", char)
        if len(decomposed) > EXPANSION_COUNTED_ABOVE:
            expansions[char] = len(decomposed)
        is_starter = [unicodedata.combining(part) == 0 for part in decomposed]
        if all(is_starter):
            continue
        if any(is_starter):
            non_starters[char] = (is_starter.index(True), is_starter[::-1].index(True), False)
        else:
            non_starters[char] = (len(decomposed), len(decomposed), True)
    return non_starters, expansions


def _character_class(chars: Iterable[str], *, also: str = "", repeat: str = "") -> re.Pattern[str]:
    """Compile ``[chars also]repeat``, with ``chars`` as ranges of consecutive code points.

    NOTE: ranges, because sre keeps a bitmap only for the BMP and checks every
    astral item of a class one by one: 200 astral literals cost ~100 ns per
    character of text scanned, a few ranges next to nothing.
    """
    code_points = sorted(map(ord, chars))
    ranges: list[list[int]] = []
    for code_point in code_points:
        if ranges and ranges[-1][1] == code_point - 1:
            ranges[-1][1] = code_point
        else:
            ranges.append([code_point, code_point])
    items = "".join(
        re.escape(chr(first)) + ("-" + re.escape(chr(last)) if last > first else "") for first, last in ranges
    )
    return re.compile(f"[{items}{also}]{repeat}")


_NON_STARTERS, _EXPANSIONS = decomposition_tables()
_NOT_A_NON_STARTER: NonStarters = (0, 0, False)
# A run of at most this many characters that begin with a non-starter cannot
# pass 30: the character before it ends in at most max(trailing), and each
# character in it adds at most max(leading). Only longer runs are walked in Python.
_LONGEST_SAFE_RUN = (MAX_NON_STARTERS - max(counts[1] for counts in _NON_STARTERS.values())) // max(
    counts[0] for counts in _NON_STARTERS.values()
)
# NOTE: all astral characters are in the class (the walk counts each exactly):
# the 200 astral non-starters make 66 ranges, which cost ~80 ns per character of
# every text scanned; one range costs ~2 ns.
_LONG_RUN = _character_class(
    (char for char, counts in _NON_STARTERS.items() if counts[0] and char <= "\uffff"),
    also="\U00010000-\U0010ffff",
    repeat=f"{{{_LONGEST_SAFE_RUN + 1},}}",
)
_LONG_EXPANSION = _character_class(_EXPANSIONS)


def normalize(text: str) -> str:
    """Return ``text`` Stream-Safe, in Unicode NFKC, with whitespace runs collapsed and trimmed.

    NFKC first, because it can turn exotic spaces (e.g. U+3000) into plain ones,
    which the whitespace pass must then see. ASCII is its own NFKC.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKC", stream_safe(text))
    # NOTE: str.split() splits on exactly what re's \s matches (str.isspace), and
    # is 4 times faster than re.sub on a text that is a space every other character.
    return " ".join(text.split())


def stream_safe(text: str) -> str:
    """Return ``text`` in UAX #15's Stream-Safe Text Format: U+034F before a 31st non-starter in a row.

    NOTE: converted rather than refused. More than 30 combining marks in a row
    is "Zalgo" decoration, which people do post and a sentiment service should
    score rather than answer with an error; UAX #15 defines this conversion for
    the purpose, and U+034F is invisible, so the text reads as it did. Counts
    are of the NFKD form, as UAX #15 defines them: U+0F73, a starter that
    decomposes into two marks, counts two.
    """
    if text.isascii() or not _LONG_RUN.search(text):
        return text
    pieces: list[str] = []
    copied_up_to = 0
    for run in _LONG_RUN.finditer(text):
        # The character before a run does not begin with a non-starter, but may end with some.
        count = _NON_STARTERS.get(text[run.start() - 1], _NOT_A_NON_STARTER)[1] if run.start() else 0
        for index in range(run.start(), run.end()):
            leading, trailing, only_non_starters = _NON_STARTERS.get(text[index], _NOT_A_NON_STARTER)
            if count + leading > MAX_NON_STARTERS:
                pieces += (text[copied_up_to:index], STREAM_SAFE_BREAK)
                copied_up_to = index
                count = 0
            count = count + leading if only_non_starters else trailing
    pieces.append(text[copied_up_to:])
    return "".join(pieces)


def expanded_length(text: str) -> int:
    """Return the length of ``text``, counting each character NFKD lengthens more than twofold at its NFKD length.

    Every other character decomposes into at most two, so NFKC writes at most
    twice this many characters.
    """
    if text.isascii():
        return len(text)
    return len(text) + sum(_EXPANSIONS[char] - 1 for char in _LONG_EXPANSION.findall(text))
