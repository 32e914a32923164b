"""Clients that hold a meinheld worker's connections: slow request heads, too many connections.

Each test runs a real gunicorn master with ``falcon_svc.workers.MeinheldWorker`` (one
worker, ``apps/sleepy_app.py``, started by ``gunicorn_masters`` from
test_meinheld_worker.py) and talks to it over real sockets. Both behaviours come from
our meinheld patch (scripts/meinheld/0004-slow-clients-and-descriptors.patch): stock
meinheld re-arms a 30 s timer on every byte of a request head, and stops its server
when accept() fails with EMFILE. Waits are bounded generously; the assertions are on
what the server did, not on how fast.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_meinheld_worker import Gunicorn, _wait_for, gunicorn_masters

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

# A request head that never ends: the request line, then one header whose value goes on.
ENDLESS_HEAD = b"GET /pid HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 4000
# The worker's deadline for a request head in these tests (production: 10 s).
HEADER_TIMEOUT = 2
# Far longer than HEADER_TIMEOUT and a whole stock 30 s read timer: a server that only
# times out idle reads never closes a client sending a byte every DRIBBLE_SECONDS.
CLOSE_WITHIN = 40.0
DRIBBLE_SECONDS = 0.5
SLOW_CLIENTS = 50

# Limits the test can exceed with a few dozen connections: the process's descriptors
# (systemd's LimitNOFILE=), and worker_connections (meinheld watches descriptors
# numbered below it).
NOFILE_LIMIT = 64
WORKER_CONNECTIONS = 48
HELD_CONNECTIONS = 100
# gunicorn's worker timeout for the gthread test: a stuck worker would be replaced well within it.
TIMEOUT_SECONDS = 3


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Start gunicorn masters with our meinheld worker on demand; kill them all at teardown."""
    with gunicorn_masters(tmp_path) as start:
        yield start


def _header_timeout_config(tmp_path: Path, seconds: int) -> Path:
    """Write a gunicorn config whose hook sets the worker's header timeout."""
    config = tmp_path / f"header_timeout_{seconds}.py"
    config.write_text(f"def post_worker_init(worker):\n    worker.header_timeout_seconds = {seconds}\n")
    return config


@dataclass
class SlowClient:
    """One connection sending its request head a byte at a time; what came back, and whether it closed."""

    sock: socket.socket
    sent: int = 0
    reply: bytes = b""
    closed: bool = False

    def read_what_came(self) -> None:
        """Collect whatever the server sent; note a close (EOF or reset)."""
        while not self.closed and select.select([self.sock], [], [], 0)[0]:
            try:
                data = self.sock.recv(65536)
            except ConnectionError:
                self.closed = True
                return
            if not data:
                self.closed = True
            self.reply += data

    def send_one_byte(self) -> None:
        try:
            self.sock.send(ENDLESS_HEAD[self.sent : self.sent + 1])
            self.sent += 1
        except ConnectionError:
            self.closed = True


def _dribble_until_closed(clients: list[SlowClient], within: float) -> None:
    """Send every open client's next byte each DRIBBLE_SECONDS until the server has closed them all."""
    deadline = time.monotonic() + within
    while True:
        for client in clients:
            client.read_what_came()
            if not client.closed:
                client.send_one_byte()
        still_open = [client for client in clients if not client.closed]
        if not still_open:
            return
        assert time.monotonic() < deadline, (
            f"{len(still_open)} of {len(clients)} slow clients still open after {within} s, each having "
            f"sent {max(c.sent for c in still_open)} bytes of its request head: nothing timed the heads out"
        )
        time.sleep(DRIBBLE_SECONDS)


def test_slow_request_heads_are_timed_out_while_normal_requests_are_served(
    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    server = start_gunicorn(config=_header_timeout_config(tmp_path, HEADER_TIMEOUT), timeout=30)
    pid = server.worker_pid()
    clients = [
        SlowClient(socket.create_connection(("127.0.0.1", server.port), timeout=10)) for _ in range(SLOW_CLIENTS)
    ]
    try:
        for client in clients:
            client.send_one_byte()

        assert server.get("/pid", timeout=10) == (200, str(pid)), "a normal request failed beside the slow clients"
        _dribble_until_closed(clients, within=CLOSE_WITHIN)
    finally:
        for client in clients:
            client.sock.close()

    replies = [client.reply for client in clients]
    assert all(reply == b"" or reply.startswith(b"HTTP/1.1 408 ") for reply in replies), (
        f"a slow client got something other than a 408 or a plain close: {set(replies)}"
    )
    timed_out = [reply for reply in replies if reply]
    assert timed_out, "no slow client got the 408 page"
    assert b'"code": "request_timeout"' in timed_out[0], f"the 408 is not our JSON error: {timed_out[0]!r}"
    assert server.get("/pid") == (200, str(pid)), f"the worker changed or stopped serving:\n{server.log()}"


def _ended_by_server(sock: socket.socket) -> bool:
    """Whether the server has given up on this connection's unfinished request head.

    Anything to read means so: a close, a reset, or an error page (stock meinheld
    answers 408 to every open connection as it stops).
    """
    return bool(select.select([sock], [], [], 0)[0])


def _finish_request(sock: socket.socket) -> tuple[int, str]:
    """End the unfinished request head on ``sock``; return the status and body."""
    sock.sendall(b"Connection: close\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read().decode()


@pytest.mark.parametrize(
    ("limit", "logged"),
    [
        ({"nofile_limit": NOFILE_LIMIT}, "Too many open files"),
        ({"worker_connections": WORKER_CONNECTIONS}, "connection limit (worker_connections) reached"),
    ],
    ids=["out-of-descriptors", "past-worker-connections"],
)
def test_full_worker_sheds_new_connections_and_recovers(
    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path, limit: dict[str, int], logged: str
) -> None:
    # A long header deadline, so the held connections stay held for the whole test.
    config = _header_timeout_config(tmp_path, 60)
    server = start_gunicorn(config=config, timeout=30, **limit)
    pid = server.worker_pid()
    clients: list[socket.socket] = []
    try:
        for _ in range(HELD_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: test\r\n")  # a head that is not finished yet
            clients.append(sock)
        _wait_for(
            lambda: any(_ended_by_server(sock) for sock in clients),
            within=20,
            what=f"the worker to shed a connection beyond its limit {limit}",
        )

        # While the worker is full, a new client is closed at once rather than left in the
        # backlog (a TimeoutError here) or served by a replacement worker.
        try:
            reply: tuple[int, str] | None = server.get("/pid", timeout=10)
        except ConnectionError:
            reply = None
        assert reply is None, f"a new connection was served while the worker should be full: {reply}\n{server.log()}"

        held = [sock for sock in clients if not _ended_by_server(sock)]
        assert held, f"the worker dropped every connection, so it stopped instead of shedding:\n{server.log()}"
        assert len(held) < HELD_CONNECTIONS, "nothing was shed, so the limit was never reached"
        for sock in held[:3]:
            assert _finish_request(sock) == (200, str(pid)), (
                f"a connection accepted before the limit was not served by the same worker:\n{server.log()}"
            )
    finally:
        for sock in clients:
            sock.close()

    _wait_for(lambda: _answers(server) == (200, str(pid)), within=20, what=f"worker {pid} to serve again")
    assert server.master_alive, f"the master died:\n{server.log()}"
    assert logged in server.log(), f"the worker did not say why it shed connections:\n{server.log()}"


def _answers(server: Gunicorn) -> tuple[int, str] | None:
    try:
        return server.get("/pid", timeout=2)
    except (OSError, http.client.HTTPException):
        return None


# --- gunicorn's gthread worker: upstream defect --------------------------------------

GTHREAD_WORKER = "falcon_svc.gunicorn_workers.ThreadWorker"


def test_upstream_defect_gthread_slow_request_head_holds_a_thread(
    start_gunicorn: Callable[..., Gunicorn],
) -> None:
    """UPSTREAM DEFECT (gunicorn 27 gthread): a request head read a byte at a time holds its thread for ever.

    gthread waits up to 5 s for a connection's first bytes without a thread, but then
    parses the head in a pool thread on a blocking socket with no deadline, and the
    worker's main loop keeps heartbeating, so ``timeout`` never fires either. With
    one thread (the default), one slow client stops the worker serving. Behind nginx,
    which sends only whole request heads, this cannot happen; the service port is
    loopback-only. If this test fails, gunicorn has changed: drop the caveat in
    falcon_svc/gunicorn_workers.py.
    """
    server = start_gunicorn(GTHREAD_WORKER, timeout=TIMEOUT_SECONDS)
    slow = SlowClient(socket.create_connection(("127.0.0.1", server.port), timeout=10))
    stop = threading.Event()

    def dribble() -> None:
        while not stop.is_set() and not slow.closed:
            slow.read_what_came()
            slow.send_one_byte()
            stop.wait(DRIBBLE_SECONDS)

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    try:
        _wait_for(lambda: slow.sent > 4, within=10, what="the slow client to start its head")
        with pytest.raises(TimeoutError):
            server.get("/pid", timeout=2 * TIMEOUT_SECONDS)  # the only thread is still reading the slow head
        assert not slow.closed, "gthread closed the slow client: gunicorn changed?"
        assert "WORKER TIMEOUT" not in server.log(), (
            f"the arbiter timed the worker out: gunicorn changed?\n{server.log()}"
        )
    finally:
        stop.set()
        dribbler.join(timeout=10)
        slow.sock.close()
