"""Parse request bodies and check them against the HTTP contract.

Each failure becomes an ``APIError`` with the right 4xx and the offending field,
so bad input never reaches the model and never becomes a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import falcon
from falcon.typing import ReadableIO

from falcon_svc.errors import APIError, invalid_input
from falcon_svc.text import expanded_length, normalize

JSON_MEDIA_TYPES = ("application/json",)
# Raw texts longer than this many times the limit are refused before normalising
# (``text.expanded_length``): room for whitespace that normalising collapses, and
# a bound on normalising's CPU (under 10 ms for any text; docs/SECURITY.md).
RAW_LENGTH_FACTOR = 2


def read_json(req: falcon.Request, max_bytes: int) -> Any:
    """Return the decoded JSON body of ``req``, which must say it is ``application/json``.

    Raises:
        APIError: 415 for a non-JSON content type, 413 for a body over
            ``max_bytes``, 400 for a body that is not strict UTF-8 JSON.
    """
    require_json_content_type(req)
    return parse_json(request_body(req, max_bytes))


def require_json_content_type(req: falcon.Request) -> None:
    """Raise a 415 unless the request says its body is ``application/json``."""
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in JSON_MEDIA_TYPES:
        raise APIError(
            falcon.HTTP_415,
            "unsupported_media_type",
            f"Send the body as application/json (got {req.content_type or 'no Content-Type'}).",
        )


def request_body(req: falcon.Request, max_bytes: int) -> bytes:
    """Return the whole body of ``req``, read once (the idempotency middleware may have read it).

    Raises:
        APIError: 413 for a body over ``max_bytes``.
    """
    raw = req.context.get("raw_body")
    if raw is None:
        raw = read_body(req, max_bytes)
    if len(raw) > max_bytes:
        raise _too_large(max_bytes)
    return raw


def read_body(req: falcon.Request, max_bytes: int) -> bytes:
    """Read up to ``max_bytes + 1`` bytes of the body, with a length or chunked.

    NOTE: one byte past the limit is read, so a chunked body (no Content-Length)
    over the limit is caught without reading all of it; a declared length over
    the limit is refused before reading anything. A broken upload is a 400.
    """
    length = req.content_length
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes)
    stream: ReadableIO
    if length is not None:
        stream = req.bounded_stream
    elif "chunked" in (req.get_header("Transfer-Encoding") or "").lower():
        # Falcon's bounded_stream reads nothing without a Content-Length; the
        # server (gunicorn, meinheld) has already undone the chunking in wsgi.input.
        stream = req.stream
    else:
        return b""
    limit = max_bytes + 1
    chunks: list[bytes] = []
    received = 0
    try:
        while received < limit:
            chunk = stream.read(limit - received)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
    except Exception as ex:  # the server's own errors: bad chunking, client gone
        raise APIError(falcon.HTTP_400, "invalid_body", f"The request body could not be read: {ex}.") from ex
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _NotStrictJSONError(ValueError):
    """Raised by the decoder's hooks for what Python's json accepts but RFC 8259 does not."""


def _reject_constant(name: str) -> Any:
    raise _NotStrictJSONError(f"{name} is not a JSON value")


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        duplicate = _first_repeated(key for key, _ in pairs)
        raise _NotStrictJSONError(f"the key {preview(duplicate)} appears more than once in one object")
    return obj


def _first_repeated(keys: Iterable[str]) -> str | None:
    """Return the first key seen a second time (None if there is none)."""
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


# NOTE: Python's json accepts NaN and Infinity and keeps the last of duplicate
# keys; both would let a client's request mean something other than it says.
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_object_without_duplicate_keys)


def parse_json(raw: bytes) -> Any:
    """Decode a body as strict JSON: UTF-8 without a BOM, no NaN/Infinity, no duplicate keys.

    Raises:
        APIError: 400 ``invalid_json`` naming what is wrong.
    """
    if not raw:
        raise APIError(falcon.HTTP_400, "invalid_json", "The request body is empty; send a JSON object.")
    try:
        # NOTE: decode first: json.loads(bytes) would guess UTF-16 or UTF-32 from
        # the first bytes and accept them; the contract is UTF-8 (RFC 8259, 8.1).
        text = raw.decode("utf-8")
    except UnicodeDecodeError as ex:
        raise APIError(falcon.HTTP_400, "invalid_json", f"The body is not UTF-8: {ex}.") from ex
    if text.startswith("\ufeff"):
        raise APIError(
            falcon.HTTP_400, "invalid_json", "The body starts with a byte order mark; send UTF-8 without one."
        )
    try:
        return _STRICT_DECODER.decode(text)
    except (ValueError, RecursionError) as ex:
        raise APIError(falcon.HTTP_400, "invalid_json", f"The body is not valid JSON: {ex}.") from ex


def _too_large(max_bytes: int) -> APIError:
    return APIError(falcon.HTTP_413, "payload_too_large", f"The request body exceeds the limit of {max_bytes} bytes.")


def require_object(body: Any) -> dict[str, Any]:
    """Return ``body`` if it is a JSON object, else raise a 422."""
    if not isinstance(body, dict):
        raise invalid_input(f"The body must be a JSON object, not {_json_type(body)}.", None)
    return body


def require_text(value: Any, field: str, max_chars: int) -> str:
    """Return ``value`` normalised, if it is a usable text; else raise a 422 naming ``field``."""
    if value is None:
        raise invalid_input(f"'{field}' is required.", field)
    if not isinstance(value, str):
        raise invalid_input(f"'{field}' must be a string, not {_json_type(value)}.", field)
    raw_limit = RAW_LENGTH_FACTOR * max_chars
    raw_length = len(value) if len(value) > raw_limit else expanded_length(value)
    if raw_length > raw_limit:
        # NOTE: checked before NFKC, which can multiply a text's length by 18
        # (U+FDFA); counting such characters at their expanded length keeps
        # normalising any accepted text under 10 ms of CPU (docs/SECURITY.md).
        raise invalid_input(
            f"'{field}' is {raw_length} characters (counting any that NFKC expands more than twofold, "
            f"like U+FDFA, at their expanded length); the limit is {max_chars} after normalisation "
            f"and {raw_limit} before.",
            field,
        )
    text = normalize(value)
    if not is_encodable(text):
        raise invalid_input(f"'{field}' holds a lone surrogate (\\ud800-\\udfff), which is not valid Unicode.", field)
    if not text:
        raise invalid_input(f"'{field}' is empty or only whitespace.", field)
    if len(text) > max_chars:
        raise invalid_input(
            f"'{field}' is {len(text)} characters after normalisation; the limit is {max_chars}.", field
        )
    return text


def require_texts(value: Any, field: str, max_items: int, max_chars: int) -> list[str]:
    """Return a non-empty list of at most ``max_items`` normalised texts, else raise a 422."""
    if value is None:
        raise invalid_input(f"'{field}' is required.", field)
    if not isinstance(value, list):
        raise invalid_input(f"'{field}' must be an array of strings, not {_json_type(value)}.", field)
    if not value:
        raise invalid_input(f"'{field}' is empty; send 1 to {max_items} texts.", field)
    if len(value) > max_items:
        raise invalid_input(f"'{field}' has {len(value)} texts; the limit is {max_items}.", field)
    return [require_text(item, f"{field}[{index}]", max_chars) for index, item in enumerate(value)]


def is_encodable(text: str) -> bool:
    """Tell whether ``text`` has no lone surrogates, which JSON allows but UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def preview(value: Any) -> str:
    """Show a client's value in a message, cut short: it may be megabytes, which the error must not echo."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _json_type(value: Any) -> str:
    """Name a decoded JSON value's type as JSON calls it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
