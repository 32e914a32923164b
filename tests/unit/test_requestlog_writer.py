"""PostgresWriter without a database: which errors are transient, values made safe, each attempt timed.

Nothing listens on the port these writers use, so every write fails as an outage
does; what PostgreSQL does with the rows is tested against a real server in
tests/integration/test_request_log_postgres.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import PoolTimeout
from requestlog_fakes import make_row, sample
from servers import free_port

from falcon_svc.requestlog import PostgresWriter
from falcon_svc.requestlog.postgres import _copy_values, is_transient
from falcon_svc.requestlog.rows import COLUMNS, row_record


@pytest.fixture
def unreachable() -> Iterator[PostgresWriter]:
    """An opened writer whose PostgreSQL refuses connections; a write gives up after its pool timeout (0.1 s)."""
    writer = PostgresWriter(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", pool_timeout=0.1, reconnect_timeout=0.5
    )
    writer.open()
    yield writer
    writer.close()


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.OperationalError("connection refused"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.QueryCanceled("statement timeout"), True),
        (PoolTimeout("no connection"), True),
        (psycopg.errors.UndefinedTable("no request_log"), False),
        (psycopg.DataError("bad value"), False),
        (ValueError("bug"), False),
    ],
)
def test_only_transient_errors_are_retried(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient
    assert isinstance(error, PostgresWriter.transient_errors) is transient, "the queue asks the writer the same"


@pytest.mark.parametrize(
    ("error", "poison"),
    [
        (psycopg.errors.NotNullViolation("null received_at"), True),
        (psycopg.DataError("bad value"), True),
        (psycopg.errors.UndefinedTable("no request_log"), False),
        (psycopg.errors.InsufficientPrivilege("no INSERT"), False),
    ],
)
def test_only_a_rows_content_counts_as_poison(error: BaseException, poison: bool) -> None:
    assert isinstance(error, PostgresWriter.poison_errors) is poison


def test_nul_and_lone_surrogates_are_replaced_not_dropped() -> None:
    row = make_row(1, text="nul\x00 and lone \ud800 surrogate")
    assert _copy_values(row_record(row))[COLUMNS.index("text")] == "nul\ufffd and lone ? surrogate"


def test_each_attempt_is_timed_as_a_postgres_call_of_its_operation(unreachable: PostgresWriter) -> None:
    def attempts() -> float:
        return sample("falcon_dependency_call_duration_seconds_count", dependency="postgres", operation="write_batch")

    def seconds() -> float:
        return sample("falcon_dependency_call_duration_seconds_sum", dependency="postgres", operation="write_batch")

    before, seconds_before = attempts(), seconds()
    with pytest.raises(PoolTimeout):
        unreachable.write([row_record(make_row(1))], operation="write_batch", wait=0.05)
    assert attempts() - before == 1, "a failed attempt is timed too"
    assert seconds() - seconds_before < 60, "the histogram must get durations, not timestamps"


@pytest.mark.parametrize(("wait", "waited"), [(None, "0.10"), (0.05, "0.05"), (30.0, "0.10")])
def test_wait_may_shorten_the_wait_for_a_connection_never_lengthen_it(
    unreachable: PostgresWriter, wait: float | None, waited: str
) -> None:
    with pytest.raises(PoolTimeout, match=rf"after {waited} sec"):
        unreachable.write([row_record(make_row(1))], operation="write_batch", wait=wait)


def test_a_writer_that_was_not_opened_says_so_and_closes_quietly() -> None:
    writer = PostgresWriter("postgresql://unused@127.0.0.1:1/none")
    with pytest.raises(RuntimeError, match=r"open\(\) was not called"):
        writer.write([row_record(make_row(1))], operation="write_batch")
    with pytest.raises(RuntimeError, match=r"open\(\) was not called"):
        writer.probe()
    writer.close()


def test_a_spool_record_from_before_migration_0002_replays_without_its_unkeyed_digest():
    """Spool files written by the previous release hold text_sha256 and no client_key_id."""
    old = {name: value for name, value in row_record(make_row(1)).items() if name not in ("text_hmac", "client_key_id")}
    old["text_sha256"] = "a" * 64
    values = dict(zip(COLUMNS, _copy_values(old), strict=True))
    assert values["text_hmac"] is None and values["client_key_id"] is None, values
    assert "text_sha256" not in COLUMNS, "the unkeyed digest must not be written again"
    assert values["log_id"] == old["log_id"] and values["received_at"] == old["received_at"], "same key: stored once"
