"""The seam between the request log's queue and its database: what a writer must do.

``PostgresWriter`` is the one in production; unit tests hand the queue a fake
that records batches and raises errors on demand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Writer(Protocol):
    """Store batches of request-log records; each call is one attempt.

    Retries, the circuit breaker and the spool are the caller's business; the
    writer only says which of its errors are worth a retry.
    """

    transient_errors: tuple[type[BaseException], ...]  # retrying might help (an outage, a timeout)
    poison_errors: tuple[type[BaseException], ...]  # a row's content is refused: retrying it cannot help

    def open(self) -> None:
        """Start connecting in the background; never wait for the database."""

    def write(self, records: Sequence[Mapping[str, Any]], *, operation: str, wait: float | None = None) -> None:
        """Store ``records`` in one transaction, each once however often it is written; raise on failure.

        ``operation`` names the call in the latency metric; ``wait`` (seconds), when
        given, shortens the wait for a free connection.
        """

    def probe(self) -> None:
        """Make one cheap round trip to the database; raise if it does not answer."""

    def warm_up(self) -> bool:
        """Have a connection ready before a run of writes; return whether the database answered.

        The writer's transient errors mean False; anything else is a bug, and propagates.
        """

    def close(self, timeout: float = 1.0) -> None:
        """Release the connections (also safe when never opened), waiting at most ``timeout`` seconds."""
