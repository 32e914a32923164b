"""What real clients send straight to a worker, over a real socket, to every worker class.

Falcon's TestClient never sees these: chunked uploads, a Content-Length of 10 GB,
``Expect: 100-continue``, HEAD, bodies that are not plain UTF-8 JSON, malformed HTTP.
Each is sent as raw bytes to a real gunicorn master (sync, gthread and our meinheld
class), and each answer must carry the documented status and the one JSON error shape.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from servers import free_port
from test_gunicorn_serving import running_service, service_env

pytestmark = pytest.mark.integration

# Small, so that "far over the limit" is a few hundred KiB on the wire.
MAX_BODY_BYTES = 16384
WORKER_CLASSES = ["sync", "gthread", "meinheld"]
# Generous: only a server that never answers (the stall being tested for) reaches it.
SOCKET_TIMEOUT = 15.0


@dataclass
class Reply:
    """One HTTP response as it came off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses received first

    def json(self) -> dict:
        return json.loads(self.body)


def parse_reply(raw: bytes) -> Reply:
    """Split raw bytes into interim 1xx statuses and the final response."""
    interim = []
    while True:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        if status >= 200:
            break
        interim.append(status)
        raw = rest
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        rest = rest[: int(headers["content-length"])]
    return Reply(status, headers, rest, interim)


def read_until_closed(sock: socket.socket) -> bytes:
    """Read what the server sends until it closes (a reset after its reply is fine)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass  # the server closed with our unread upload in its buffer: its reply came first
    return b"".join(chunks)


def exchange(port: int, head: str, body: bytes = b"") -> Reply:
    """Send a request (``Connection: close``) as raw bytes and return the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        # Refused mid-upload (broken pipe, reset): the reply is what matters.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head.encode("latin-1") + body)
        return parse_reply(read_until_closed(sock))


def post_head(path: str, *extra: str, content_type: str = "application/json") -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Type: {content_type}", "Connection: close", *extra]
    return "\r\n".join(lines) + "\r\n\r\n"


def chunked(body: bytes, size: int) -> bytes:
    """Encode ``body`` with Transfer-Encoding: chunked, ``size`` bytes a chunk."""
    pieces = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\n\r\n"


def assert_json_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, f"expected {status}, got {reply.status}: {reply.body[:300]!r}"
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], "an error must say what went wrong"


@pytest.fixture(scope="module", params=WORKER_CLASSES)
def port(request, dummy_model_dir, tmp_path_factory) -> Iterator[int]:
    """A real `falcon-svc serve` master with one worker of the class under test."""
    tmp_path = tmp_path_factory.mktemp(f"edges-{request.param}")
    port = free_port()
    env = service_env(
        dummy_model_dir,
        port,
        tmp_path,
        WORKER_CLASS=request.param,
        WORKERS="1",
        MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        REQUEST_LOG_ENABLED="false",
        ACCESS_LOG="false",
    )
    with running_service(env, tmp_path / "service.log"):
        yield port


def test_a_chunked_body_is_read(port):
    body = json.dumps({"texts": ["a fine day", "a dreadful day"]}).encode()
    reply = exchange(port, post_head("/infer/batch", "Transfer-Encoding: chunked"), chunked(body, 7))
    assert reply.status == 200, reply.body
    assert reply.json()["count"] == 2, reply.body


def test_a_chunked_body_over_the_limit_is_json_413(port):
    body = json.dumps({"text": "x" * (4 * MAX_BODY_BYTES)}).encode()
    reply = exchange(port, post_head("/infer", "Transfer-Encoding: chunked"), chunked(body, 4096))
    assert_json_error(reply, 413, "payload_too_large")


def test_a_body_far_over_the_limit_is_json_413(port):
    body = json.dumps({"text": "x" * (16 * MAX_BODY_BYTES)}).encode()
    reply = exchange(port, post_head("/infer", f"Content-Length: {len(body)}"), body)
    assert_json_error(reply, 413, "payload_too_large")
    assert str(MAX_BODY_BYTES) in reply.json()["error"]["message"], "the 413 names the limit"


def test_a_huge_content_length_is_refused_before_any_body_is_sent(port):
    # Nothing but the headers is sent: the server must answer without waiting for 10 GB.
    reply = exchange(port, post_head("/infer", "Content-Length: 10000000000"))
    assert_json_error(reply, 413, "payload_too_large")


def test_expect_100_continue_is_answered_before_the_body(port):
    body = json.dumps({"text": "what a lovely morning"}).encode()
    head = post_head("/infer", f"Content-Length: {len(body)}", "Expect: 100-continue")
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(head.encode())
        # A client waits for the 100 before it sends the body (curl: for 1 s). A server
        # that answers only once the body is in never sends it: recv() times out here.
        interim = sock.recv(64)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(body)
        reply = parse_reply(read_until_closed(sock))
    assert reply.status == 200, reply.body
    assert reply.json()["label"] in {"negative", "neutral", "positive"}


def test_expect_100_continue_over_the_limit_gets_413_without_the_body(port):
    # gunicorn sends its 100 Continue before the app sees the length (allowed: the
    # final status follows at once); meinheld refuses the length first. Either way
    # the client gets the 413 without having to send the body.
    reply = exchange(port, post_head("/infer", f"Content-Length: {8 * MAX_BODY_BYTES}", "Expect: 100-continue"))
    assert_json_error(reply, 413, "payload_too_large")


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_head_on_the_probes_is_200(port, path):
    reply = exchange(port, f"HEAD {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    assert reply.status == 200, reply
    assert reply.body == b"", "a HEAD reply has no body"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ('{"text": "good"}'.encode("utf-16"), "UTF-16"),
        (b'\xef\xbb\xbf{"text": "good"}', "byte order mark"),
        (b'{"text": "good", "score": NaN}', "NaN"),
        (b'{"text": "good", "score": Infinity}', "Infinity"),
        (b'{"text": "good", "text": "bad"}', "duplicate key"),
        (b'{"text": "\xff"}', "not UTF-8"),
    ],
    ids=["utf-16", "bom", "nan", "infinity", "duplicate-key", "latin-1"],
)
def test_a_body_that_is_not_strict_utf8_json_is_400(port, raw, why):
    reply = exchange(port, post_head("/infer", f"Content-Length: {len(raw)}"), raw)
    assert_json_error(reply, 400, "invalid_json")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        ("GARBAGE\r\n\r\n", 400),
        ("GET /healthz HTTP/1.1\r\nHost: test\r\nBad Header Name: x\r\n\r\n", 400),
        (f"GET /{'a' * 9000} HTTP/1.1\r\nHost: test\r\n\r\n", None),  # over limit_request_line
    ],
    ids=["request-line", "header-name", "long-uri"],
)
def test_malformed_http_gets_a_json_error_from_the_server_itself(port, request_bytes, status):
    reply = exchange(port, request_bytes)
    assert 400 <= reply.status < 500, reply
    if status is not None:
        assert reply.status == status, reply
    assert reply.headers.get("content-type", "").startswith("application/json"), (reply.headers, reply.body)
    body = reply.json()
    assert set(body["error"]) == {"code", "message", "field"} and body["error"]["message"], body
