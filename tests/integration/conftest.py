"""Fixtures shared by the integration tests: real servers on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import PostgresServer, RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, stopped at teardown (tests may stop and restart it)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster (initdb + pg_ctl) shared by one module's tests, destroyed after them."""
    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    server.init()
    try:
        yield server
    finally:
        server.destroy()
