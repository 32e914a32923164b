"""Normalisation: NFKC, whitespace collapsed, trimmed."""

from hypothesis import given
from hypothesis import strategies as st

from falcon_svc.text import normalize


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
