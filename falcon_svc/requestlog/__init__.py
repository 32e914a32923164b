"""The PostgreSQL request log: one row per answered request, never at a request's expense.

How a row flows: the request path ``submit``s a ``LogRow``, which appends it
to this process's write-ahead file (``wal``: on disk before the response is
sent) and puts it in the in-memory queue (``queue.RequestLog``); a writer
thread hands batches to the ``Writer`` (``postgres.PostgresWriter``), which
stores each batch in one transaction. When PostgreSQL is down, slow or past its
breaker, or the queue is full, rows are left on disk for replay instead (their
write-ahead segment is kept, or, for a row it could not take, the spool:
``spool``, ``spool_files``), and the replayer thread (``replay``) writes them
once PostgreSQL is healthy; it also replays the segments of workers that died.
``migrate`` applies the schema in ``migrations/``.

Modules: ``rows`` (the row), ``writer`` (the seam the queue writes through),
``queue``, ``wal``, ``replay``, ``postgres``, ``spool``, ``spool_files``, ``migrate``.
"""

from falcon_svc.requestlog.postgres import PostgresWriter
from falcon_svc.requestlog.queue import RequestLog
from falcon_svc.requestlog.rows import LogRow
from falcon_svc.requestlog.spool import Spool
from falcon_svc.requestlog.wal import WriteAheadLog
from falcon_svc.requestlog.writer import Writer

__all__ = ["LogRow", "PostgresWriter", "RequestLog", "Spool", "WriteAheadLog", "Writer"]
