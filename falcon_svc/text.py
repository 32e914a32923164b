"""Normalise input text: the one place that decides what the model and cache see."""

import re
import unicodedata

MAX_TEXT_CHARS = 5000

_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Return ``text`` in Unicode NFKC with whitespace runs collapsed and trimmed.

    NFKC first, because it can turn exotic spaces (e.g. U+3000) into plain ones,
    which the whitespace pass must then see.
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()
