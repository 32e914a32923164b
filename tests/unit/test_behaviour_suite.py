"""The behavioural suite: its cases, and how a model's answers are scored."""

from __future__ import annotations

from falcon_svc.training.behaviour import format_suite, load_cases, run_suite
from falcon_svc.training.data import LABELS

# The capabilities issue 14 names: negation, intensifiers, contrast "but", emoji, typos, neutral facts.
CAPABILITIES = {"negation", "intensifiers", "contrast_but", "emoji", "typos", "neutral_facts"}


def test_the_shipped_cases_cover_each_capability_with_valid_labels():
    cases = load_cases()
    assert {capability for capability, _text, _label in cases} == CAPABILITIES
    for capability in CAPABILITIES:
        assert sum(case[0] == capability for case in cases) >= 5, capability
    assert {label for _c, _t, label in cases} <= set(LABELS)
    assert len({text for _c, text, _l in cases}) == len(cases), "no text twice"


def test_pass_rates_and_failures_are_counted_per_capability():
    cases = [("negation", "not good", "negative"), ("negation", "not bad", "positive"), ("emoji", ":)", "positive")]
    answers = {"not good": "negative", "not bad": "negative", ":)": "positive"}
    suite = run_suite(lambda texts: [answers[text] for text in texts], cases)
    assert suite["pass_rate"] == round(2 / 3, 4)
    assert suite["capabilities"]["negation"] == {
        "n": 2,
        "passed": 1,
        "pass_rate": 0.5,
        "failures": [{"text": "not bad", "expected": "positive", "predicted": "negative"}],
    }
    assert suite["capabilities"]["emoji"]["pass_rate"] == 1.0
    assert format_suite(suite) == "behavioural suite: 67% passed (negation 1/2, emoji 1/1)"
