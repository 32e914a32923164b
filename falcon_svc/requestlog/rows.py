"""The request-log row: what one answered request leaves in ``request_log``, and its spool form."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii

from falcon_svc.requestlog.spool_files import Record, encode


@dataclass(slots=True)
class LogRow:
    """One answered request, as stored in ``request_log``.

    ``received_at`` is Unix epoch seconds as a float (``time.time()``): the
    cheapest timestamp to take on the request path, and exact in JSON for the
    spool; PostgreSQL turns it into a ``timestamptz`` with ``to_timestamp``.
    ``text`` is kept only when the log was built with ``log_text=True``
    (LOG_REQUEST_TEXT); otherwise ``submit`` blanks it before it is queued or spooled.
    ``text_hmac`` is the keyed digest of the text (``text_hmac``, LOG_TEXT_HMAC_KEY),
    None without a key; ``client_key_id`` the id of the API key that authenticated
    the request (never the key itself), None without one.

    NOTE: spool files written before migration 0002 hold ``text_sha256`` and no
    ``client_key_id``: the writer reads records by these names, so their rows are
    replayed with both NULL (the unkeyed digest is deliberately not carried over).
    """

    log_id: str
    request_id: str
    received_at: float
    route: str | None
    method: str | None
    status: int | None
    worker_id: str | None
    model_version: str | None
    label: str | None
    confidence: float | None
    n_texts: int | None
    cache_hit: bool | None
    idempotent_replay: bool | None
    latency_ms: float | None
    text_length: int | None
    text_hmac: str | None
    text: str | None = None
    client_key_id: str | None = None


# The columns of request_log that a row fills, in LogRow's order (the COPY's order too).
COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LogRow))


def row_record(row: LogRow) -> Record:
    """Return ``row`` as the JSON-ready dict the spool stores and the writer takes."""
    return {name: getattr(row, name) for name in COLUMNS}


class _NotPlainJSONError(ValueError):
    """A value the fast encoder leaves to ``json``: not of its column's type, or NaN/infinite."""


# NOTE: each raises TypeError (``encode_basestring_ascii``, ``float.__repr__``) or
# _NotPlainJSONError for a value not of its column's type: encode_row then falls back.
def _text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def _real(value: float | None) -> str:
    if value is None:
        return "null"
    if value - value == 0.0:  # NOTE: False for NaN and the infinities, which json spells its own way
        return float.__repr__(value)
    raise _NotPlainJSONError(value)


def _whole(value: int | None) -> str:
    if value is None:
        return "null"
    if type(value) is int:  # NOTE: not a bool, which int.__repr__ would take
        return int.__repr__(value)
    raise _NotPlainJSONError(value)


def _flag(value: bool | None) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "true" if value else "false"
    raise _NotPlainJSONError(value)


def encode_row(row: LogRow) -> bytes:
    """Return ``row`` as its spool line: the bytes ``encode(row_record(row))`` gives, two to three times as fast.

    NOTE: this runs on the request path for every row (the write-ahead log), where
    ``json.dumps`` of a fresh dict costs about 10 us; one f-string of the known
    columns, each formatted by ``json``'s own string escaper or the float/int repr
    json uses, costs about 4. A value not of its column's type (or NaN, infinite)
    takes ``json.dumps``, whose ValueError or TypeError for an unencodable value
    propagates. The columns are LogRow's, in its order: a test checks the bytes
    against ``encode(row_record(row))``, so a column added to LogRow but not here fails it.
    """
    try:
        line = (
            f'{{"log_id":{encode_basestring_ascii(row.log_id)},"request_id":{encode_basestring_ascii(row.request_id)},'
            f'"received_at":{_real(row.received_at)},"route":{_text(row.route)},"method":{_text(row.method)},'
            f'"status":{_whole(row.status)},"worker_id":{_text(row.worker_id)},'
            f'"model_version":{_text(row.model_version)},"label":{_text(row.label)},'
            f'"confidence":{_real(row.confidence)},"n_texts":{_whole(row.n_texts)},'
            f'"cache_hit":{_flag(row.cache_hit)},"idempotent_replay":{_flag(row.idempotent_replay)},'
            f'"latency_ms":{_real(row.latency_ms)},"text_length":{_whole(row.text_length)},'
            f'"text_hmac":{_text(row.text_hmac)},"text":{_text(row.text)},"client_key_id":{_text(row.client_key_id)}}}\n'
        )
    except (_NotPlainJSONError, TypeError):
        return encode(row_record(row))
    return line.encode("ascii")


def text_hmac(key: bytes | None, digests: Sequence[str]) -> str | None:
    """Return the keyed digest logged for texts whose sha256 hex ``digests`` are given; None without a key.

    One text: HMAC-SHA256(key, its sha256 hex). A batch: the HMAC of its digests
    joined by U+001E, in order, so the same batch always gives the same value.

    NOTE: the HMAC is over the sha256 the request path already computed for the
    cache key (one extra HMAC of 64 bytes per row, about a microsecond), not over
    the text. It is still keyed: without the key nobody can compute the HMAC of a
    guessed text's sha256, so a dictionary of short texts no longer reverses the
    log (sha256 being collision resistant, hash-then-MAC is as strong as the HMAC).
    """
    if key is None or not digests:
        return None
    return hmac.new(key, "\x1e".join(digests).encode("ascii"), hashlib.sha256).hexdigest()
