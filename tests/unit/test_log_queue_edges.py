"""The request log's writer thread: how long a written batch took, and why a batch was not written."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from requestlog_fakes import FakeWriter, TransientError, make_log, make_row, sample

from falcon_svc.requestlog import Spool

QUEUE_LOGGER = "falcon_svc.requestlog.queue"


def test_a_written_batch_observes_its_duration(tmp_path: Path) -> None:
    writer = FakeWriter()
    log = make_log(writer, Spool(tmp_path / "spool", 10**7), batch_size=3)
    count_before = sample("falcon_request_log_batch_duration_seconds_count")
    sum_before = sample("falcon_request_log_batch_duration_seconds_sum")
    log.start()
    try:
        for i in range(3):
            log.submit(make_row(i))
        writer.wait_until(lambda w: len(w.stored) == 1, "the batch was written")
    finally:
        log.close(timeout=5.0)
    assert sample("falcon_request_log_batch_duration_seconds_count") == count_before + 1, "no duration observed"
    # A real write takes some time; 0.0 would mean the measured duration was never handed over.
    assert sample("falcon_request_log_batch_duration_seconds_sum") > sum_before, "the batch's duration was 0"


@pytest.mark.parametrize(
    ("error", "attempts", "traceback"),
    [(TransientError("connection lost"), 3, False), (RuntimeError("a bug in the writer"), 1, True)],
    ids=["outage-no-traceback", "other-with-traceback"],
)
def test_a_batch_not_written_is_logged_with_its_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, attempts: int, traceback: bool
) -> None:
    writer = FakeWriter()
    writer.failing = error
    log = make_log(writer, Spool(tmp_path / "spool", 10**7), batch_size=3)
    with caplog.at_level(logging.WARNING, logger=QUEUE_LOGGER):
        log.start()
        try:
            for i in range(3):
                log.submit(make_row(i))
            writer.wait_until(lambda w: len(w.calls) == attempts, f"{attempts} write attempts")
        finally:
            log.close(timeout=5.0)  # joins the writer thread: its warning is logged by now
    records = [record for record in caplog.records if record.name == QUEUE_LOGGER]
    expected = f"request-log: batch of 3 rows not written ({type(error).__name__}: {error}); spooling it"
    assert [record.getMessage() for record in records] == [expected], [record.getMessage() for record in records]
    assert bool(records[0].exc_info) is traceback, "an outage logs one line; anything else its traceback"
