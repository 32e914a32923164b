"""The service over TLS to real Redis and PostgreSQL, configured as the Ansible roles configure a fleet.

Redis speaks only TLS (the redis role's ``port 0`` and ``tls-*`` lines) and keeps the
role's ACL users; PostgreSQL serves TLS 1.2+ and takes the writer role only over
``hostssl`` with scram-sha-256. The service gets REDIS_URL and DATABASE_URL in the
shape the falcon_svc role writes them when it is given the CA (vars/main.yml):
``rediss://...?ssl_ca_certs=...&ssl_check_hostname=true`` and
``postgresql://...?sslmode=verify-full&sslrootcert=...``. The certificates are made
per session by openssl: a CA, and a server certificate it signs for 127.0.0.1.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import falcon.testing
import psycopg
import pytest
import redis
from psycopg import sql
from servers import PostgresServer, RedisServer, TlsFiles, make_ca, make_server_tls
from test_postgres_grants import DATABASE, OWNER, ROLES_DIR, TABLE_GRANTS, WRITER
from test_redis_acl import PASSWORDS, acl_lines
from test_redis_cache_idempotency import cache_key_of, infer, wait_until
from test_service_faults import wait_for_rows

from falcon_svc.app import create_app
from falcon_svc.dependencies import Dependencies, build_redis_dependencies, build_request_log, make_redis_client
from falcon_svc.model import Model
from falcon_svc.redis_tls import PinnedCATLSConnection, pinned_context
from falcon_svc.requestlog.migrate import apply_migrations
from falcon_svc.settings import Settings

pytestmark = pytest.mark.integration

WRITER_PASSWORD = "writer-secret-0123456789"
REDIS_PASSWORD = PASSWORDS["redis_falcon_password"]
# NOTE: the role keeps loopback lines `host` (hostssl is for the app hosts' networks);
# here the service is on loopback, so loopback stands for their network: TLS or nothing.
# The superuser line is the tests' own (fixtures, migrations, polling), TLS too.
HBA = [
    "local    all          all                     trust",
    "hostssl  all          postgres  127.0.0.1/32  trust",
    f"hostssl  {DATABASE}  {OWNER},{WRITER}  127.0.0.1/32  scram-sha-256",
]
# What the falcon_svc role appends to each URL when given a CA; checked against the role
# below, so a change there fails here rather than leaving this test on an old shape.
REDIS_TLS_QUERY = "?ssl_ca_certs={ca}&ssl_check_hostname=true"
DATABASE_TLS_QUERY = "?sslmode=verify-full&sslrootcert={ca}"


def role_url(url: str, query: str, ca: Path) -> str:
    """Append ``query`` for ``ca`` to ``url``, after checking the falcon_svc role still writes that query."""
    role_vars = (ROLES_DIR / "falcon_svc" / "vars" / "main.yml").read_text()
    for part in query.split("{ca}"):
        assert part in role_vars, f"the falcon_svc role no longer writes {part!r} into its URLs: update this test"
    return url + query.format(ca=ca)


def redis_url(server: RedisServer, ca: Path) -> str:
    return role_url(f"rediss://falcon:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0", REDIS_TLS_QUERY, ca)


def database_url(server: PostgresServer, ca: Path) -> str:
    base = f"postgresql://{WRITER}:{WRITER_PASSWORD}@127.0.0.1:{server.port}/{DATABASE}"
    return role_url(base, DATABASE_TLS_QUERY, ca)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_server_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that signed nothing the servers hold: a host given the wrong CA file."""
    return make_ca(tmp_path_factory.mktemp("other-ca"), "other-ca")[0]


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), tls=tls, config=acl_lines())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_postgres(module_postgres: PostgresServer, tls: TlsFiles) -> PostgresServer:
    """The module's cluster on TLS, migrated, with the writer role and the role's grants on request_log."""
    module_postgres.enable_tls(tls, HBA)
    with psycopg.connect(module_postgres.dsn, autocommit=True) as conn:
        # NOTE: the password is stored as scram-sha-256 (password_encryption's default since PostgreSQL 14).
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(WRITER), sql.Literal(WRITER_PASSWORD))
        )
    apply_migrations(module_postgres.dsn)
    TABLE_GRANTS.run(module_postgres, DATABASE)
    return module_postgres


def service_settings(
    model_dir: Path, spool_dir: Path, redis_server: RedisServer, postgres: PostgresServer, ca: Path
) -> Settings:
    """Settings read as a worker reads its environment file (URL checks included), trusting ``ca``."""
    return Settings.from_env(
        {
            "MODEL_DIR": str(model_dir),
            "INSTANCE_NAME": "tls",
            "ACCESS_LOG": "off",
            "REDIS_URL": redis_url(redis_server, ca),
            "DATABASE_URL": database_url(postgres, ca),
            "LOG_SPOOL_DIR": str(spool_dir),
            "LOG_FLUSH_INTERVAL_MS": "50",
            # Every text goes to Redis, and no in-process tier answers a repeat: a hit is Redis's.
            "CACHE_REDIS_MIN_CHARS": "0",
            "CACHE_LOCAL_ITEMS": "0",
        }
    )


@contextmanager
def service(settings: Settings, model: Model) -> Iterator[falcon.testing.TestClient]:
    """The app as get_app() builds it in a worker: the Redis cache and the request log from ``settings``."""
    deps = Dependencies()
    build_redis_dependencies(settings, model.version, deps)
    build_request_log(settings, deps).start()
    try:
        yield falcon.testing.TestClient(create_app(settings, model, dependencies=deps, worker_id="tls:1"))
    finally:
        deps.close(timeout=2.0)


def test_the_service_caches_in_redis_and_logs_to_postgres_over_verified_tls(
    dummy_model_dir: Path,
    model: Model,
    tmp_path: Path,
    tls: TlsFiles,
    tls_redis: RedisServer,
    tls_postgres: PostgresServer,
) -> None:
    settings = service_settings(dummy_model_dir, tmp_path / "spool", tls_redis, tls_postgres, tls.ca_cert)
    text = "The room was quiet and the staff were kind"
    with service(settings, model) as client:
        first = infer(client, text)
        assert first.status_code == 200 and first.json["cache_hit"] is False, first.text
        # The cache writes from a background thread: wait until it reached Redis, read as the service reads.
        as_the_service = make_redis_client(settings)
        # The service's connections trust our CA alone (redis_tls.py), not the system's store too.
        assert as_the_service.connection_pool.connection_class is PinnedCATLSConnection
        trusted = pinned_context(str(tls.ca_cert), True, ssl.CERT_REQUIRED).get_ca_certs()
        assert [dict(cert["subject"][0])["commonName"] for cert in trusted] == ["test-ca"], trusted
        key = cache_key_of(model, text)
        wait_until(lambda: as_the_service.get(key) is not None, "the cache's write reached Redis over TLS")
        second = infer(client, text)
        assert second.status_code == 200 and second.json["cache_hit"] is True, f"not served from Redis: {second.text}"

        request_ids = {first.json["request_id"], second.json["request_id"]}
        logged = wait_for_rows(tls_postgres, request_ids, within=15)
        assert request_ids <= set(logged), f"request-log rows missing: {request_ids - set(logged)}"
        # Server side: every connection of the writer role (the request log's pool) is TLS.
        with psycopg.connect(tls_postgres.dsn) as conn:
            connections = conn.execute(
                "SELECT application_name, ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = %s",
                [WRITER],
            ).fetchall()
        assert connections, "the request log holds no connection as the writer role"
        assert all(ssl for _, ssl in connections), f"a writer connection without TLS: {connections}"

    # A client without TLS is refused by both: TLS is required, not merely offered. (The
    # service's own Redis client, without redis-py's retries, on a plain redis:// URL.)
    plain_url = f"redis://falcon:{REDIS_PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    plain_redis = make_redis_client(replace(settings, redis_url=plain_url))
    with pytest.raises(redis.ConnectionError):
        plain_redis.ping()
    plain_dsn = f"postgresql://{WRITER}:{WRITER_PASSWORD}@127.0.0.1:{tls_postgres.port}/{DATABASE}?sslmode=disable"
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plain_dsn, connect_timeout=5).close()


def test_servers_signed_by_another_ca_are_refused_and_the_service_serves_degraded(
    dummy_model_dir: Path,
    model: Model,
    tmp_path: Path,
    other_ca: Path,
    tls_redis: RedisServer,
    tls_postgres: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = service_settings(dummy_model_dir, tmp_path / "spool", tls_redis, tls_postgres, other_ca)
    with caplog.at_level(logging.WARNING, logger="falcon_svc.dependencies"), service(settings, model) as client:
        # Each start-up probe failed, and for the certificate (not a wrong port or password).
        degraded = [record.getMessage() for record in caplog.records if "DEGRADED" in record.getMessage()]
        assert len(degraded) == 2, degraded
        assert all("certificate verify failed" in message.lower() for message in degraded), degraded

        result = infer(client, "served without Redis and without PostgreSQL")
        assert result.status_code == 200 and result.json["cache_hit"] is False, result.text
        ready = client.simulate_get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json["degraded"] == ["postgres", "redis"], ready.json
        held = ready.json["request_log"]
        # The row is on disk (the write-ahead log in the spool directory), held for replay.
        assert held["postgres"] != "up" and held["spool_bytes"] > 0, held
