"""The redis role's ACL users on a real redis-server: the service works as `falcon`, no more.

The `user` lines come from ansible/roles/redis/vars/main.yml (the bind line from its
defaults), rendered by a small renderer for the one Jinja construct they use
(``{{ var | hash('sha256') }}``; jinja2 is not a dependency of the service): anything
else is left in place and fails the render check, so the role cannot quietly outgrow it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import falcon.testing
import pytest
import redis
import yaml
from servers import RedisServer, wait_for_port

from falcon_svc.app import create_app
from falcon_svc.cache import cache_key
from falcon_svc.dependencies import Dependencies, build_redis_dependencies
from falcon_svc.inference import text_digest
from falcon_svc.model import Model
from falcon_svc.settings import Settings
from falcon_svc.text import normalize

pytestmark = pytest.mark.integration
ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "redis"
PASSWORDS = {
    "redis_falcon_password": "falcon-secret-0123456789",
    "redis_exporter_password": "exporter-secret-0123456789",
}
_HASHED = re.compile(r"\{\{\s*(\w+)\s*\|\s*hash\('sha256'\)\s*\}\}")


def acl_lines() -> list[str]:
    """Render the role's `user` lines with the test passwords."""
    lines = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["_redis_acl_users"]
    rendered = [_HASHED.sub(lambda m: hashlib.sha256(PASSWORDS[m[1]].encode()).hexdigest(), line) for line in lines]
    assert not any("{" in line for line in rendered), f"a construct the renderer does not know: {rendered}"
    return rendered


class AclRedisServer(RedisServer):
    """A redis-server whose config file holds the role's ACL users (as redis.conf does)."""

    def start(self) -> None:
        config = self.directory / "redis.conf"
        # The role's bind line too: "-::1" must not stop a host without IPv6 from starting.
        bind = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())["redis_bind"]
        settings = [f"port {self.port}", f"bind {bind}", 'save ""', "appendonly no", f"dir {self.directory}"]
        config.write_text("\n".join([*settings, *acl_lines()]) + "\n")
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen([self._binary, str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)

    def client(self, user: str | None, password: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=user, password=password)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedisServer]:
    server = AclRedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def falcon_client(acl_redis: AclRedisServer) -> redis.Redis:
    return acl_redis.client("falcon", PASSWORDS["redis_falcon_password"])


@pytest.fixture
def exporter_client(acl_redis: AclRedisServer) -> redis.Redis:
    return acl_redis.client("exporter", PASSWORDS["redis_exporter_password"])


def test_the_service_caches_and_replays_as_the_falcon_user(
    settings: Settings, model: Model, acl_redis: AclRedisServer, falcon_client: redis.Redis
) -> None:
    url = f"redis://falcon:{PASSWORDS['redis_falcon_password']}@127.0.0.1:{acl_redis.port}/0"
    settings = replace(settings, redis_url=url, cache_redis_min_chars=0)
    deps = Dependencies()
    build_redis_dependencies(settings, model.version, deps)
    try:
        client = falcon.testing.TestClient(create_app(settings, model, dependencies=deps, worker_id="t:1"))
        headers = {"Content-Type": "application/json", "X-Idempotency-Key": "acl-1"}
        # A fresh server has no scripts: the first claim goes EVALSHA -> NOSCRIPT -> SCRIPT LOAD.
        first = client.simulate_post("/infer", body=json.dumps({"text": "pay once"}), headers=headers)
        replay = client.simulate_post("/infer", body=json.dumps({"text": "pay once"}), headers=headers)
        assert first.status_code == replay.status_code == 200, (first.text, replay.text)
        assert replay.headers.get("idempotent-replayed") == "true", "the idempotency record did not reach Redis"
        # The cache writes from a background thread: wait for its pipelined SET.
        key = cache_key("falcon:cache", model.version, text_digest(normalize("pay once")))
        deadline = time.monotonic() + 10
        while falcon_client.get(key) is None:
            assert time.monotonic() < deadline, "the cache never wrote to Redis as `falcon`"
            time.sleep(0.02)
    finally:
        deps.close(timeout=1.0)


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("KEYS", "*"),
        ("GET", "other:key"),
        ("SET", "other:key", "1"),
    ],
    ids=["flushall", "config-set", "keys", "get-outside-prefix", "set-outside-prefix"],
)
def test_the_falcon_user_is_refused_anything_else(falcon_client: redis.Redis, command: tuple[str, ...]) -> None:
    assert falcon_client.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        falcon_client.execute_command(*command)


def test_the_exporter_user_reads_stats_but_no_keys(exporter_client: redis.Redis) -> None:
    assert exporter_client.ping()
    assert "redis_version" in exporter_client.info()
    assert exporter_client.config_get("maxmemory")
    for command in [
        ("GET", "falcon:cache:x"),
        ("SET", "falcon:cache:x", "1"),
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "1"),
    ]:
        with pytest.raises(redis.exceptions.NoPermissionError):
            exporter_client.execute_command(*command)


def test_the_default_user_cannot_authenticate(acl_redis: AclRedisServer) -> None:
    for password in ("", PASSWORDS["redis_falcon_password"]):
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
            acl_redis.client(None, password).ping()
    anonymous = redis.Redis(host="127.0.0.1", port=acl_redis.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get("falcon:cache:x")
