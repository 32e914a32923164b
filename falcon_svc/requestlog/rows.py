"""The request-log row: what one answered request leaves in ``request_log``, and its spool form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from falcon_svc.requestlog.spool_files import Record


@dataclass(slots=True)
class LogRow:
    """One answered request, as stored in ``request_log``.

    ``received_at`` is Unix epoch seconds as a float (``time.time()``): the
    cheapest timestamp to take on the request path, and exact in JSON for the
    spool; PostgreSQL turns it into a ``timestamptz`` with ``to_timestamp``.
    ``text`` is kept only when the log was built with ``log_text=True``
    (LOG_REQUEST_TEXT); otherwise ``submit`` blanks it before it is queued or spooled.
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
    text_sha256: str | None
    text: str | None = None


# The columns of request_log that a row fills, in LogRow's order (the COPY's order too).
COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LogRow))


def row_record(row: LogRow) -> Record:
    """Return ``row`` as the JSON-ready dict the spool stores and the writer takes."""
    return {name: getattr(row, name) for name in COLUMNS}
