"""Hide credentials in text before it is logged or printed: the one place that knows how.

REDIS_URL and DATABASE_URL carry passwords (``redis://:PASSWORD@host``,
``postgresql://user:PASSWORD@host/db``), and libpq also reads key=value
connection strings (``host=db password=PASSWORD``). Every log line, error
message and printed summary that may hold one goes through ``redact``.

It errs towards hiding too much: a password with an unencoded ``@`` or ``/``,
a quoted value with escapes, or a ``password=`` in a URL's query are hidden
whole, at the cost of sometimes hiding a little text after them.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://userinfo@ : the userinfo runs to the LAST "@" of the token, so a
# password holding an unencoded "@" or "/" is hidden whole. A user name alone
# (no ":") is kept: it says which role connected and is not a secret.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s'\"<>]*)@")

# password=VALUE in a libpq key=value string or a URL query; VALUE is quoted
# ('...' with backslash escapes, as libpq reads it) or runs to the next space.
_PASSWORD_PARAMETER = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|sslpassword)\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|(?:\\.|\S)+)",
    re.IGNORECASE,
)


# An API key, wherever it appears (``Authorization: Bearer ...`` or pasted alone):
# the id part of ours (``fsk_<id>_``) is kept, it says whose key leaked.
_BEARER = re.compile(r"(?P<key>\bBearer\s+)\S+", re.IGNORECASE)
_API_KEY = re.compile(r"\b(?P<prefix>fsk_[A-Za-z0-9.-]{1,64}_)[A-Za-z0-9_-]+")


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _secret = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}{colon}{MASK if colon else ''}@"


def redact(text: object) -> str:
    """Return ``str(text)`` with every URL password, ``password=`` value and API key replaced by ``***``."""
    masked = _URL_USERINFO.sub(_mask_userinfo, str(text))
    masked = _BEARER.sub(lambda match: f"{match['key']}{MASK}", masked)
    masked = _API_KEY.sub(lambda match: f"{match['prefix']}{MASK}", masked)
    return _PASSWORD_PARAMETER.sub(lambda match: f"{match['key']}{MASK}", masked)
