"""The in-process cache tier: bounded, least recently used out first, entries expire."""

from __future__ import annotations

from falcon_svc.cache import LocalLRU
from falcon_svc.model import Prediction


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prediction(label: str) -> Prediction:
    return Prediction(label, 0.9, {"negative": 0.05, "neutral": 0.05, "positive": 0.9})


def test_an_entry_is_served_until_its_ttl_and_not_after():
    clock = FakeClock()
    cache = LocalLRU(max_items=10, ttl=60.0, clock=clock)
    cache.put("k", prediction("positive"))
    clock.now += 59.999
    assert cache.get("k") == prediction("positive"), "still fresh just before the TTL"
    clock.now += 0.001
    assert cache.get("k") is None, "expired at the TTL exactly"
    clock.now -= 30.0
    assert cache.get("k") is None, "an expired entry is gone, not hidden: it is not back when time runs back"


def test_a_new_put_renews_the_ttl():
    clock = FakeClock()
    cache = LocalLRU(max_items=10, ttl=60.0, clock=clock)
    cache.put("k", prediction("negative"))
    clock.now += 50.0
    cache.put("k", prediction("positive"))
    clock.now += 50.0
    assert cache.get("k") == prediction("positive")


def test_the_least_recently_used_entry_goes_first():
    cache = LocalLRU(max_items=2, ttl=60.0, clock=FakeClock())
    cache.put("a", prediction("positive"))
    cache.put("b", prediction("neutral"))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", prediction("negative"))
    assert cache.get("b") is None, "b was the least recently used"
    assert cache.get("a") == prediction("positive")
    assert cache.get("c") == prediction("negative")


def test_zero_items_means_no_local_tier():
    cache = LocalLRU(max_items=0, ttl=60.0, clock=FakeClock())
    cache.put("k", prediction("positive"))
    assert cache.get("k") is None
