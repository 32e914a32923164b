"""The PostgreSQL request log: one row per answered request, never at a request's expense.

How a row flows: the request path ``submit``s a ``LogRow`` to the in-memory
queue (``queue.RequestLog``); a writer thread hands batches to the ``Writer``
(``postgres.PostgresWriter``), which stores each batch in one transaction. When
PostgreSQL is down, slow or past its breaker, or the queue is full, rows go to
the on-disk spool (``spool``, ``spool_files``) instead, and the replayer thread
(``replay``) writes them once PostgreSQL is healthy. ``migrate`` applies the
schema in ``migrations/``.

Modules: ``rows`` (the row), ``writer`` (the seam the queue writes through),
``queue``, ``replay``, ``postgres``, ``spool``, ``spool_files``, ``migrate``.
"""

from falcon_svc.requestlog.postgres import PostgresWriter
from falcon_svc.requestlog.queue import RequestLog
from falcon_svc.requestlog.rows import LogRow
from falcon_svc.requestlog.spool import Spool
from falcon_svc.requestlog.writer import Writer

__all__ = ["LogRow", "PostgresWriter", "RequestLog", "Spool", "Writer"]
