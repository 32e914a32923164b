"""``falcon_svc.redact``: no password survives, whatever shape the connection string has."""

from __future__ import annotations

import pytest

from falcon_svc.redact import redact

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"redis://:{SECRET}@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        (f"rediss://falcon:{SECRET}@cache:6380/1", "rediss://falcon:***@cache:6380/1"),
        (f"postgresql://falcon:{SECRET}@db/falcon", "postgresql://falcon:***@db/falcon"),
        (f"DATABASE_URL='postgres://u:{SECRET}@db/x' must start", "DATABASE_URL='postgres://u:***@db/x' must start"),
        (f"host=db user=falcon password={SECRET} dbname=x", "host=db user=falcon password=*** dbname=x"),
        (f"host=db password = '{SECRET} with space' port=5", "host=db password = *** port=5"),
        (f"host=db PASSWORD='it\\'s {SECRET}'", "host=db PASSWORD=***"),
        (f"postgresql://db/x?sslmode=require&password={SECRET}", "postgresql://db/x?sslmode=require&password=***"),
        # Unencoded "@" and "/" in a password: libpq and redis-py may still read these.
        (f"redis://:{SECRET}@x@cache:6379/0", "redis://:***@cache:6379/0"),
        (f"postgresql://u:a/{SECRET}@db/x", "postgresql://u:***@db/x"),
        (
            f"two: redis://:{SECRET}@r/0 and postgresql://u:{SECRET}@p/d",
            "two: redis://:***@r/0 and postgresql://u:***@p/d",
        ),
    ],
)
def test_passwords_are_masked(text, expected):
    masked = redact(text)
    assert masked == expected
    assert SECRET not in masked, f"the password survived: {masked}"


@pytest.mark.parametrize(
    "text",
    [
        "redis://127.0.0.1:6379/0",
        "postgresql://falcon@127.0.0.1:5432/falcon",
        "unix:///run/redis/redis.sock?db=0",
        'connection to server at "127.0.0.1", port 5432 failed: Connection refused',
        "plain text, an email me@example.com, and a path /var/spool",
    ],
)
def test_text_without_passwords_is_unchanged(text):
    assert redact(text) == text, "redact changed text that holds no password"


def test_exceptions_are_accepted_as_text():
    assert redact(ValueError(f"bad url redis://:{SECRET}@h/0")) == "bad url redis://:***@h/0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer fsk_ci_0123abcd", "Authorization: Bearer ***"),
        ("authorization: bearer some-opaque-token", "authorization: bearer ***"),
        ("pasted fsk_e2e_9f86d081884c7d65 by mistake", "pasted fsk_e2e_*** by mistake"),
    ],
)
def test_api_keys_are_hidden_and_the_id_is_kept(text, expected):
    # A safety net under falcon_svc/auth, which never logs a key: a key pasted into
    # an error message or a header echoed by a library still does not reach the journal.
    assert redact(text) == expected
