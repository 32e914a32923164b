"""API keys at nginx (nginx/falcon-svc.conf.j2): the rate limit per key, the key id in the log.

A real nginx in front of json_worker, a fake worker that accepts any Bearer key and
names its id in X-Client-Key-Id as the service does (the service checks the keys
itself; these tests are about what nginx does with them).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from test_gunicorn_serving import call
from test_nginx import Proxy, json_worker, key_id_of, running_nginx

pytestmark = pytest.mark.integration
# One request a minute refills a bucket far slower than any test runs: the first
# 1 + burst requests of a bucket pass, the rest get 429 (unless a run takes a minute,
# which each test checks).
SLOW_RATE = "1r/m"


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with json_worker() as port:
        yield port


def statuses(proxy: Proxy, count: int, headers: dict[str, str] | None = None) -> list[int]:
    return [call(proxy.port, "GET", "/healthz", headers=headers)[0] for _ in range(count)]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_each_key_from_one_address_has_its_own_bucket(upstream, tmp_path):
    """Two clients behind one NAT address, each with its key, do not share a limit."""
    burst = 2
    bucket = [200] * (1 + burst) + [429]
    with running_nginx(
        tmp_path / "nginx", [upstream], rate=SLOW_RATE, burst=burst, falcon_address_rate_burst=100
    ) as proxy:
        started = time.monotonic()
        first, second, keyless = (
            statuses(proxy, 4, bearer("key-one-0123456789")),
            statuses(proxy, 4, bearer("key-two-0123456789")),
            statuses(proxy, 4),
        )
        elapsed = time.monotonic() - started
    assert elapsed < 60, f"the run took {elapsed:.0f} s: nginx refilled the buckets, the counts are moot"
    assert (first, second, keyless) == (bucket, bucket, bucket), (
        f"one key {first}, another key {second}, no key {keyless}: want {bucket} each (separate buckets)"
    )


@pytest.mark.parametrize(
    "odd",
    ["Basic dXNlcjpwYXNz", "Bearer " + "k" * 201, "Bearer two words", "Bearer"],
    ids=["basic", "too-long", "two-words", "empty"],
)
def test_without_a_sane_key_the_client_address_is_the_bucket(upstream, tmp_path, odd):
    """No key, or one in no sane shape: counted by address (behind a trusted balancer: the client's)."""
    burst = 2
    with running_nginx(
        tmp_path / "nginx",
        [upstream],
        rate=SLOW_RATE,
        burst=burst,
        falcon_address_rate_burst=100,
        falcon_real_ip_from=["127.0.0.1"],
    ) as proxy:
        started = time.monotonic()
        client = {"X-Forwarded-For": "203.0.113.9"}
        spent = statuses(proxy, 1 + burst, client)
        odd_from_client = statuses(proxy, 1, client | {"Authorization": odd})
        other_client = statuses(proxy, 1, {"X-Forwarded-For": "203.0.113.10"})
        elapsed = time.monotonic() - started
    assert elapsed < 60, f"the run took {elapsed:.0f} s: nginx refilled the buckets, the counts are moot"
    assert spent == [200] * (1 + burst), f"the first {1 + burst} requests of a client were refused: {spent}"
    assert odd_from_client == [429], f"{odd[:20]!r} escaped the spent address's bucket: {odd_from_client}"
    assert other_client == [200], f"another address shared the first one's bucket: {other_client}"


def test_rotating_keys_do_not_escape_the_per_address_limit(upstream, tmp_path):
    """nginx cannot tell made-up keys from real ones: the address bounds them all together."""
    address_burst, sent = 4, 8
    with running_nginx(
        tmp_path / "nginx",
        [upstream],
        rate=SLOW_RATE,
        burst=100,
        falcon_address_rate_limit=SLOW_RATE,
        falcon_address_rate_burst=address_burst,
    ) as proxy:
        started = time.monotonic()
        replies = [call(proxy.port, "GET", "/healthz", headers=bearer(uuid.uuid4().hex)) for _ in range(sent)]
        elapsed = time.monotonic() - started
    got = [status for status, _, _ in replies]
    assert elapsed < 60, f"the run took {elapsed:.0f} s: nginx refilled the bucket, the counts are moot"
    assert got == [200] * (1 + address_burst) + [429] * (sent - 1 - address_burst), f"fresh key each time: {got}"
    _, headers, body = replies[-1]
    assert body["error"] == {"code": "too_many_requests", "message": "Rate limit exceeded; retry later.", "field": None}
    assert headers["Retry-After"] == "1", headers


def test_access_log_names_the_key_id_and_never_the_key(upstream, tmp_path):
    key = "fsk-" + uuid.uuid4().hex
    with_key, without_key = uuid.uuid4().hex, uuid.uuid4().hex
    with running_nginx(tmp_path / "nginx", [upstream]) as proxy:
        assert call(proxy.port, "GET", "/healthz", headers=bearer(key) | {"X-Request-ID": with_key})[0] == 200
        assert call(proxy.port, "GET", "/healthz", headers={"X-Request-ID": without_key})[0] == 200
        entries = proxy.log_entries(lambda es: {with_key, without_key} <= {e["request_id"] for e in es})
        logged = proxy.access_log.read_text() + (tmp_path / "nginx" / "error.log").read_text()
    by_id = {entry["request_id"]: entry for entry in entries}
    assert by_id[with_key]["client_key_id"] == key_id_of(key), by_id[with_key]
    assert by_id[without_key]["client_key_id"] == "-", by_id[without_key]
    assert key not in logged and key.removeprefix("fsk-") not in logged, "the API key itself is in nginx's logs"
