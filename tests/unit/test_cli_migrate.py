"""`falcon-svc migrate --if-reachable` (what `make run` calls first) against an unreachable PostgreSQL."""

from __future__ import annotations

import pytest
from servers import free_port

from falcon_svc import cli


@pytest.fixture
def unreachable_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATABASE_URL points at a loopback port nobody listens on."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://falcon@127.0.0.1:{free_port()}/falcon")


@pytest.mark.usefixtures("unreachable_database")
def test_if_reachable_says_degraded_when_the_request_log_is_on(monkeypatch, capsys):
    monkeypatch.setenv("REQUEST_LOG_ENABLED", "true")
    assert cli.main(["migrate", "--if-reachable"]) == 0
    assert "DEGRADED: PostgreSQL unreachable" in capsys.readouterr().err


@pytest.mark.usefixtures("unreachable_database")
def test_if_reachable_is_silent_about_postgresql_when_the_request_log_is_off(monkeypatch, capsys):
    monkeypatch.setenv("REQUEST_LOG_ENABLED", "false")
    assert cli.main(["migrate", "--if-reachable"]) == 0
    output = capsys.readouterr()
    assert "DEGRADED" not in output.out + output.err, "no PostgreSQL is needed, so nothing is degraded"
    assert "REQUEST_LOG_ENABLED=false" in output.out, "it says why it did nothing"


@pytest.mark.usefixtures("unreachable_database")
def test_plain_migrate_still_tries_when_the_request_log_is_off(monkeypatch, capsys):
    monkeypatch.setenv("REQUEST_LOG_ENABLED", "false")
    assert cli.main(["migrate"]) == 1, "an explicit migrate against a dead database must fail"
    assert "migrate:" in capsys.readouterr().err


@pytest.mark.usefixtures("unreachable_database")
def test_an_empty_log_level_means_the_default(monkeypatch, capsys):
    # An env file may write `LOG_LEVEL=` to leave it unset (the retention unit's did):
    # the command must run, not die in logging.setLevel('') with a traceback.
    monkeypatch.setenv("LOG_LEVEL", "")
    monkeypatch.setenv("REQUEST_LOG_ENABLED", "false")
    assert cli.main(["migrate", "--if-reachable"]) == 0
