"""nginx/falcon-svc.conf.j2 rendered and served by a real nginx in front of real workers.

The template is rendered here by a small renderer for the few Jinja constructs it
uses (jinja2 is not a dependency of the service); any construct it does not know
is left in place and fails the render check, so the template cannot quietly
outgrow it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import free_port, stop_process, wait_for_port
from test_gunicorn_serving import call, running_service, service_env
from tools import require_tool

from falcon_svc.resources import ui

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "nginx" / "falcon-svc.conf.j2"
HEX_ID = re.compile(r"[0-9a-f]{32}")
WEB_ROOT = REPO_ROOT / "falcon_svc" / "web"


def comment(text: str) -> str:
    """Ansible's `comment` filter with its defaults: the text framed as a # block."""
    return "\n".join(["#", *(f"# {line}" for line in text.splitlines()), "#"])


def truthy(value: object) -> bool:
    """Jinja's `| bool` as Ansible defines it: a real bool, or a true-looking string or number."""
    return value if isinstance(value, bool) else str(value).strip().lower() in {"true", "yes", "on", "1"}


# An if block (trim_blocks: its tags eat their newline) holding no other if: innermost first.
IF_BLOCK = re.compile(
    r"\{% if (\w+) \| bool %\}\n((?:(?!\{% if ).)*?)(?:\{% else %\}\n((?:(?!\{% if ).)*?))?\{% endif %\}\n",
    re.DOTALL,
)


def render(template: str, variables: dict[str, object]) -> str:
    """Render the template's Jinja subset: for loops, `{% if x | bool %}`, `| comment`, `| default('...')`."""

    def loop(match: re.Match[str]) -> str:
        name, items, body = match.groups()
        return "".join(body.replace(f"{{{{ {name} }}}}", str(item)) for item in variables[items])

    def expression(match: re.Match[str]) -> str:
        name, filter_name, argument = match.groups()
        if filter_name == "comment":
            return comment(str(variables[name]))
        if filter_name == "default":
            return str(variables.get(name, argument))
        return str(variables[name])

    # trim_blocks, as Ansible's template module sets it: a block tag eats its newline.
    text = re.sub(r"\{% for (\w+) in (\w+) %\}\n(.*?)\{% endfor %\}\n", loop, template, flags=re.DOTALL)
    while (block := IF_BLOCK.search(text)) is not None:
        name, then, otherwise = block.groups()
        chosen = then if truthy(variables[name]) else otherwise or ""
        text = text[: block.start()] + chosen + text[block.end() :]
    text = re.sub(r"\{\{ (\w+)(?: \| (comment|default)(?:\('([^']*)'\))?)? \}\}", expression, text)
    leftover = re.findall(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", text)
    assert not leftover, f"the test renderer does not know these template constructs: {leftover}"
    return text


@dataclass
class Proxy:
    """A running nginx: its address, public (plain HTTP) and status ports, and its JSON access log.

    ``https_port`` is None unless the test rendered TLS on.
    """

    port: int
    status_port: int
    access_log: Path
    host: str = "127.0.0.1"
    https_port: int | None = None

    def log_entries(self, until: Callable[[list[dict]], bool] = bool, within: float = 5.0) -> list[dict]:
        """The access log's entries, once ``until(entries)`` holds (or ``within`` seconds passed).

        NOTE: nginx writes a request's line after it has sent the response, so a line
        may land a moment after the client has its answer: wait for what the test needs.
        """
        deadline = time.monotonic() + within
        while True:
            entries = [json.loads(line) for line in self.access_log.read_text().splitlines()]
            if until(entries) or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)


# The role's defaults for the client limits (ansible/roles/nginx/defaults/main.yml),
# except limits no test reaches by accident; a test overrides what it probes.
# TLS is off here: `tls=` of running_nginx turns it on (test_nginx_tls.py).
CLIENT_LIMITS: dict[str, object] = {
    "falcon_address_rate_limit": "1000r/s",
    "falcon_address_rate_burst": 1000,
    "falcon_http_redirect": True,
    "falcon_plain_http_addresses": ["127.0.0.1", "::1"],
    "falcon_conn_limit": 100,
    "falcon_client_header_timeout": "10s",
    "falcon_client_body_timeout": "10s",
    "falcon_send_timeout": "10s",
    "falcon_client_keepalive_timeout": "10s",
    "falcon_client_body_buffer_size": "256k",
    "falcon_proxy_max_temp_file_size": "16m",
    "falcon_real_ip_from": [],
}


@dataclass
class TlsFiles:
    """A certificate and its private key, as PEM files."""

    certificate: Path
    key: Path


def tls_variables(proxy: Proxy, tls: TlsFiles | None) -> dict[str, object]:
    """The template's TLS variables: off, or on for ``proxy``'s https port with ``tls``'s files."""
    if tls is None:
        return {"falcon_tls_enabled": False}
    return {
        "falcon_tls_enabled": True,
        "falcon_nginx_https_listen": f"{proxy.host}:{proxy.https_port}",
        "falcon_https_port_suffix": f":{proxy.https_port}",
        "falcon_tls_certificate": str(tls.certificate),
        "falcon_tls_certificate_key": str(tls.key),
    }


@contextmanager
def running_nginx(
    directory: Path,
    worker_ports: list[int],
    rate: str = "1000r/s",
    burst: int = 1000,
    host: str = "127.0.0.1",
    tls: TlsFiles | None = None,
    **overrides: object,
) -> Iterator[Proxy]:
    """Render the template for `worker_ports`, check it with `nginx -t`, serve it, always stop it.

    nginx listens on ``host`` (any loopback address); with ``tls`` it also serves
    HTTPS with those files on a port of its own. ``overrides`` replace template
    variables by name (``falcon_conn_limit=2``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    proxy = Proxy(
        port=free_port(),
        status_port=free_port(),
        access_log=directory / "access.log",
        host=host,
        https_port=free_port() if tls else None,
    )
    site = directory / "falcon-svc.conf"
    unknown = set(overrides) - set(CLIENT_LIMITS) - {"falcon_unlimited_clients_file"}
    # The role writes this file with no address in it; so does every test that does not name its own.
    unlimited = directory / "unlimited.conf"
    unlimited.write_text("# no address is exempt from the rate limits\n")
    overrides = {"falcon_unlimited_clients_file": str(unlimited)} | overrides
    assert not unknown, f"not a client-limit variable of the template: {unknown}"
    site.write_text(
        render(
            TEMPLATE.read_text(),
            {
                "ansible_managed": "Ansible managed: test render",
                "falcon_upstream_servers": [f"127.0.0.1:{port}" for port in worker_ports],
                "falcon_nginx_listen": f"{host}:{proxy.port}",
                "falcon_nginx_status_port": proxy.status_port,
                "falcon_max_body_size": "2m",
                "falcon_rate_limit": rate,
                "falcon_rate_burst": burst,
                "falcon_proxy_read_timeout": "35s",
                "falcon_nginx_access_log": str(proxy.access_log),
                "falcon_web_root": str(WEB_ROOT),
            }
            | CLIENT_LIMITS
            | tls_variables(proxy, tls)
            | overrides,
        )
    )
    temp_paths = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # NOTE: as root, nginx workers would run as nobody and could not read pytest's 0700 tmp dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main_conf = directory / "nginx.conf"
    main_conf.write_text(
        f"{user}worker_processes 1;\npid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n    access_log off;\n{temp_paths}\n    include {site};\n}}\n"
    )
    nginx = require_tool("nginx", "nginx")
    command = [nginx, "-c", str(main_conf), "-p", str(directory), "-e", str(directory / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=10, check=False)
    assert checked.returncode == 0, f"nginx -t rejects the rendered template:\n{checked.stderr}"
    process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(proxy.status_port, within=10)
        for port in (proxy.port, proxy.https_port):
            if port is not None:
                wait_for_address(host, port, within=10)
        yield proxy
    finally:
        stop_process(process, timeout=10)


def wait_for_address(host: str, port: int, within: float) -> None:
    """Wait until something listens on ``host:port`` (servers.wait_for_port knows 127.0.0.1 only)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {within} s")


def start_worker(stack: ExitStack, model_dir: Path, directory: Path, name: str) -> tuple[int, subprocess.Popen]:
    """Start one falcon-svc unit (meinheld, dummy model) whose worker_id starts with `name`."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    env = service_env(model_dir, port, directory, WORKER_CLASS="meinheld", WORKERS="1", INSTANCE_NAME=name)
    return port, stack.enter_context(running_service(env, directory / "service.log"))


def answered_by(body: dict) -> str:
    """The unit name in worker_id (`name:pid`)."""
    return body["worker_id"].split(":", 1)[0]


@pytest.fixture(scope="module")
def worker_ports(dummy_model_dir, tmp_path_factory) -> Iterator[list[int]]:
    directory = tmp_path_factory.mktemp("workers")
    with ExitStack() as stack:
        yield [start_worker(stack, dummy_model_dir, directory / name, name)[0] for name in ("unit-a", "unit-b")]


@pytest.fixture(scope="module")
def proxy(worker_ports, tmp_path_factory) -> Iterator[Proxy]:
    with running_nginx(tmp_path_factory.mktemp("nginx"), worker_ports) as running:
        yield running


def test_template_starts_with_the_ansible_managed_banner():
    rendered = render(
        TEMPLATE.read_text(),
        {name: "x" for name in re.findall(r"\{\{ (falcon_\w+) \}\}", TEMPLATE.read_text())}
        | {
            "ansible_managed": "Ansible managed",
            "falcon_upstream_servers": ["127.0.0.1:8001"],
            "falcon_real_ip_from": [],
        }
        | {"falcon_tls_enabled": True, "falcon_http_redirect": True, "falcon_plain_http_addresses": []},
    )
    assert rendered.startswith("#\n# Ansible managed\n#\n"), rendered[:80]


def test_infer_classifies_and_reaches_both_units(proxy):
    units = set()
    for i in range(8):
        status, headers, body = call(proxy.port, "POST", "/infer", {"text": f"I really like this {i}"})
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json") and "label" in body, body
        units.add(answered_by(body))
    assert units == {"unit-a", "unit-b"}, f"nginx sent every request to {units}"


def test_service_errors_pass_through_unchanged(proxy):
    status, _, body = call(proxy.port, "POST", "/infer", {"text": "   "})
    assert status == 422, body
    assert body["error"]["code"] == "invalid_input" and body["error"]["field"] == "text", body


def test_oversized_body_gets_json_413_from_nginx(proxy):
    status, headers, body = call(proxy.port, "POST", "/infer", {"text": "x" * (2 * 1024 * 1024)})
    assert status == 413, body
    assert body == {
        "error": {"code": "payload_too_large", "message": "The request body is larger than 2m.", "field": None}
    }
    assert HEX_ID.fullmatch(headers["X-Request-ID"]), headers


def test_burst_over_the_rate_limit_gets_json_429(worker_ports, tmp_path):
    # NOTE: at one request a minute nginx refills the bucket too slowly for the
    # machine's speed to matter: the first 1 + burst requests pass, every later one
    # is refused, unless the whole run takes a minute (checked below).
    burst, sent = 5, 10
    with running_nginx(tmp_path / "nginx", worker_ports, rate="1r/m", burst=burst) as limited:
        started = time.monotonic()
        replies = [call(limited.port, "GET", "/healthz") for _ in range(sent)]
        elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in replies]
    assert elapsed < 60, f"{sent} requests took {elapsed:.0f} s: nginx refilled the bucket, the counts are moot"
    assert statuses == [200] * (1 + burst) + [429] * (sent - 1 - burst), f"burst {burst} at 1 r/m: {statuses}"
    rejected = [(headers, body) for status, headers, body in replies if status == 429]
    headers, body = rejected[0]
    assert body["error"]["code"] == "too_many_requests" and body["error"]["field"] is None, body
    assert body["error"]["message"] == "Rate limit exceeded; retry later.", body
    assert headers["Retry-After"] == "1" and HEX_ID.fullmatch(headers["X-Request-ID"]), headers


def test_addresses_in_the_unlimited_file_skip_both_rate_limits(worker_ports, tmp_path):
    # What the saturation drills do (scripts/faults/lib.sh): loopback into the file the
    # role writes empty, for the drill's run only.
    unlimited = tmp_path / "unlimited.conf"
    limits = {"rate": "1r/m", "burst": 1, "falcon_address_rate_limit": "1r/m", "falcon_address_rate_burst": 1}
    statuses = {}
    for name, content in (("role", "# none\n"), ("drill", "127.0.0.1 1;\n::1 1;\n"), ("elsewhere", "10.9.8.7 1;\n")):
        unlimited.write_text(content)
        with running_nginx(
            tmp_path / name, worker_ports, falcon_unlimited_clients_file=str(unlimited), **limits
        ) as proxy:
            statuses[name] = [call(proxy.port, "GET", "/healthz")[0] for _ in range(6)]
    assert statuses["drill"] == [200] * 6, statuses
    assert statuses["role"] == statuses["elsewhere"] == [200, 200] + [429] * 4, statuses


def request_with_id(port: int, request_id: str | None):
    """POST /infer with an optional X-Request-ID; return (status, response headers)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/infer",
        data=b'{"text": "ids"}',
        method="POST",
        headers={"Content-Type": "application/json"} | ({"X-Request-ID": request_id} if request_id else {}),
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers


def test_request_id_is_kept_or_made_and_logged(proxy):
    status, headers = request_with_id(proxy.port, "client-id-42")
    assert status == 200 and headers.get_all("X-Request-ID") == ["client-id-42"], headers.items()
    status, headers = request_with_id(proxy.port, None)
    made = headers.get_all("X-Request-ID")
    assert status == 200 and len(made) == 1 and HEX_ID.fullmatch(made[0]), headers.items()
    # An id the worker would refuse is replaced by nginx, so both log the same id.
    status, headers = request_with_id(proxy.port, "not a sane id!")
    replaced = headers["X-Request-ID"]
    assert status == 200 and HEX_ID.fullmatch(replaced), headers.items()
    ids = {"client-id-42", made[0], replaced}
    entries = proxy.log_entries(lambda es: ids <= {e["request_id"] for e in es})
    logged = {entry["request_id"]: entry for entry in entries}
    for request_id in ids:
        assert request_id in logged, f"{request_id} is not in nginx's access log"
    assert logged[replaced]["status"] == 200 and logged[replaced]["upstream_addr"].startswith("127.0.0.1:")


def test_access_log_is_one_json_object_per_line(proxy):
    request_id = uuid.uuid4().hex
    status, _, _ = fetch(proxy.port, "/healthz", headers={"X-Request-ID": request_id})
    assert status == 200
    # json.loads on every line: one bad line fails here.
    entries = proxy.log_entries(lambda es: any(e["request_id"] == request_id for e in es))
    ours = [entry for entry in entries if entry["request_id"] == request_id]
    assert len(ours) == 1, f"our /healthz request is not logged once: {entries[-3:]}"
    expected = {
        "time",
        "request_id",
        "remote_addr",
        "method",
        "uri",
        "status",
        "bytes",
        "request_time",
        "upstream_addr",
        "upstream_status",
        "upstream_response_time",
    }
    assert all(expected <= set(entry) for entry in entries), entries[-1]
    assert ours[0]["uri"] == "/healthz" and ours[0]["method"] == "GET" and ours[0]["status"] == 200, ours[0]


@pytest.mark.parametrize(
    "path",
    [
        "/metrics",
        "/metrics/",
        "/METRICS",
        "/Metrics/",
        "/%6detrics",
        "/%6D%65trics/",
        "//metrics",
        "/metrics/.",
        "/./metrics",
        "/static/../metrics",
        "/metrics?x",
        "/metrics/?name[]=falcon_http_requests_total",
        "/metrics%2F",
    ],
)
def test_worker_metrics_are_not_public(proxy, path):
    request_id = uuid.uuid4().hex
    status, headers, body = call(proxy.port, "GET", path, headers={"X-Request-ID": request_id})
    assert status == 404 and headers["Content-Type"].startswith("application/json"), (status, str(body)[:300])
    assert body["error"]["code"] == "not_found", body
    # nginx's own layer: it answered without asking a worker (the app refuses these too).
    entries = proxy.log_entries(lambda es: any(e["request_id"] == request_id for e in es))
    (entry,) = [e for e in entries if e["request_id"] == request_id]
    assert entry["upstream_addr"] == "", f"nginx passed {path} to a worker: {entry}"


def test_readyz_through_nginx_says_status_only(proxy):
    status, _, body = call(proxy.port, "GET", "/readyz")
    assert status == 200 and body == {"status": "ready"}, body


def test_models_through_nginx_show_no_training_metadata(proxy):
    status, _, body = call(proxy.port, "GET", "/v1/models")
    public = {"name", "version", "labels", "serving", "active"}
    assert status == 200 and [set(entry) for entry in body["models"]] == [public], body


def test_stub_status_answers_on_the_loopback_status_port(proxy):
    status, _, body = call(proxy.status_port, "GET", "/stub_status")
    assert status == 200 and body.startswith("Active connections:"), body


def test_no_worker_left_gets_json_502(tmp_path):
    with running_nginx(tmp_path / "nginx", [free_port()]) as dead:
        status, _, body = call(dead.port, "POST", "/infer", {"text": "anyone?"})
    assert status == 502 and body["error"]["code"] == "bad_gateway", body


def test_a_stopped_unit_is_failed_over_without_an_error(dummy_model_dir, worker_ports, tmp_path):
    with ExitStack() as stack:
        victim_port, victim = start_worker(stack, dummy_model_dir, tmp_path / "unit-c", "unit-c")
        proxy = stack.enter_context(running_nginx(tmp_path / "nginx", [worker_ports[0], victim_port]))
        units = {answered_by(call(proxy.port, "POST", "/infer", {"text": f"warm {i}"})[2]) for i in range(6)}
        assert units == {"unit-a", "unit-c"}, f"both units should serve before the stop: {units}"
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(timeout=30) == 0, "the stopped unit should drain and exit 0"
        replies = [call(proxy.port, "POST", "/infer", {"text": f"after {i}"}) for i in range(20)]
        statuses = [status for status, _, _ in replies]
        assert statuses == [200] * 20, f"a request failed after the stop: {statuses}"
        assert {answered_by(body) for _, _, body in replies} == {"unit-a"}
        entries = proxy.log_entries(lambda es: any(", " in e["upstream_addr"] for e in es))
        retried = [entry for entry in entries if ", " in entry["upstream_addr"]]
        assert retried, "no request was retried on the other unit: the stop was never noticed"


@contextmanager
def fake_worker(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """Listen like a worker on a free port; hand each connection to ``handle`` on its own thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def key_id_of(key: str) -> str:
    """The key id json_worker names for ``key``: not the key, and not derivable back to it."""
    return "kid-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def read_request(connection: socket.socket) -> tuple[str, dict[str, str], bytes] | None:
    """Read one HTTP/1.1 request: (request line, headers with lower-case names, body); None if closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = connection.recv(65536)
        if not chunk:
            return None
        body += chunk
    return line, headers, body


@contextmanager
def json_worker() -> Iterator[int]:
    """Listen like a worker that checks API keys: 200 JSON to every request, X-Client-Key-Id for a Bearer key.

    The body echoes the method, target and body length, so a test can see what reached
    the worker. Any key is accepted (key checks are the app's, tested there).
    """

    def answer(connection: socket.socket) -> None:
        with connection, suppress(OSError):
            connection.settimeout(30)
            while (request := read_request(connection)) is not None:
                line, headers, body = request
                method, target, _ = line.split(" ", 2)
                payload = json.dumps({"method": method, "target": target, "body_bytes": len(body)}).encode()
                extra = ""
                if (authorization := headers.get("authorization", "")).startswith("Bearer "):
                    extra = f"X-Client-Key-Id: {key_id_of(authorization.removeprefix('Bearer '))}\r\n"
                connection.sendall(
                    f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                    f"{extra}\r\n".encode()
                    + payload
                )

    with fake_worker(answer) as port:
        yield port


@contextmanager
def dying_worker() -> Iterator[int]:
    """Listen like a worker, read each request, then close without answering (a worker killed mid-request)."""

    def read_then_close(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(2)
            with suppress(OSError):
                connection.recv(65536)

    with fake_worker(read_then_close) as port:
        yield port


def test_a_post_whose_worker_died_mid_request_is_retried(worker_ports, tmp_path):
    """non_idempotent: a POST already sent to a worker that then dies is passed to the next one."""
    with dying_worker() as dying_port, running_nginx(tmp_path / "nginx", [dying_port, worker_ports[0]]) as proxy:
        statuses = [call(proxy.port, "POST", "/infer", {"text": f"retry me {i}"})[0] for i in range(4)]
        entries = proxy.log_entries(lambda es: len(es) >= 4)
    assert statuses == [200] * 4, f"a POST failed when its first worker died mid-request: {statuses}"
    retried = [entry for entry in entries if entry["upstream_status"].startswith("502, ")]
    assert retried, f"no POST reached the dying worker and was retried: {entries}"


def test_upstream_keepalive_is_used_and_closed_by_nginx_first(proxy, worker_ports):
    """nginx keeps idle connections to the workers, and drops them before gunicorn's 5 s would."""
    for _ in range(10):
        call(proxy.port, "GET", "/healthz")
    assert established_to(worker_ports) >= 1, "no idle keep-alive connection to a worker after 10 requests"
    time.sleep(2.5)  # past nginx's keepalive_timeout 1s, well before gunicorn's KEEPALIVE_SECONDS=5
    assert established_to(worker_ports) == 0, "nginx still holds idle upstream connections after 2.5 s"


def established_to(ports: list[int]) -> int:
    """Count established TCP connections accepted on the given local ports."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state = int(fields[1].rsplit(":", 1)[1], 16), fields[3]
            count += state == "01" and local_port in ports
    return count


def fetch(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None):
    """Return (status, headers, raw body bytes) for one request, errors included."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.headers, ex.read()


def served_without_a_worker(proxy: Proxy, uri: str) -> bool:
    """Whether nginx's log shows ``uri`` answered with no upstream (from disk)."""
    entries = proxy.log_entries(lambda es: any(e["uri"] == uri for e in es))
    return [entry["upstream_addr"] for entry in entries if entry["uri"] == uri][-1] == ""


def test_demo_page_is_served_from_disk_with_the_apps_headers(proxy):
    status, headers, body = fetch(proxy.port, "/")
    assert status == 200, body
    assert body == (WEB_ROOT / "index.html").read_bytes(), "nginx did not serve falcon_svc/web/index.html"
    assert headers["Content-Type"] == ui.CONTENT_TYPES[".html"], headers.items()
    assert headers["Cache-Control"] == ui.REVALIDATE and headers["ETag"], headers.items()
    assert headers["Content-Security-Policy"] == ui.CONTENT_SECURITY_POLICY, "nginx and the app send different CSPs"
    assert headers["X-Content-Type-Options"] == "nosniff", headers.items()
    assert HEX_ID.fullmatch(headers["X-Request-ID"]), headers.items()
    assert served_without_a_worker(proxy, "/"), "GET / went to a worker instead of disk"


@pytest.mark.parametrize("name", ui.OWN_ASSETS)
def test_static_files_are_served_from_disk(proxy, name):
    path = f"/static/{name}"
    status, headers, body = fetch(proxy.port, path)
    assert status == 200, body
    assert body == (WEB_ROOT / name).read_bytes(), f"nginx did not serve falcon_svc/web/{name}"
    assert headers["Content-Type"] == ui.CONTENT_TYPES[Path(name).suffix], headers.items()
    assert headers["Cache-Control"] == ui.REVALIDATE, headers.items()
    assert served_without_a_worker(proxy, path), f"GET {path} went to a worker instead of disk"


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/index.html", "/static/../app.py"])
def test_unknown_static_files_get_json_404(proxy, path):
    status, headers, body = fetch(proxy.port, path)
    assert status == 404, body
    assert headers["Content-Type"].startswith("application/json"), headers.items()
    assert json.loads(body)["error"]["code"] == "not_found", body


def test_post_to_the_demo_page_gets_json_405(proxy):
    status, headers, body = fetch(proxy.port, "/", method="POST", headers={"Content-Type": "application/json"})
    assert status == 405, body
    assert json.loads(body)["error"]["code"] == "method_not_allowed", body
    assert headers["Allow"] == "GET, HEAD" and HEX_ID.fullmatch(headers["X-Request-ID"]), headers.items()


def test_docs_page_is_proxied_to_the_app(proxy):
    status, headers, body = fetch(proxy.port, "/docs")
    assert status == 200, body
    assert body == (WEB_ROOT / "docs.html").read_bytes(), body[:200]
    assert headers["Content-Security-Policy"] == ui.CONTENT_SECURITY_POLICY, headers.items()


def test_swagger_ui_script_is_proxied_gzipped_and_cacheable(proxy):
    status, headers, body = fetch(proxy.port, "/docs/swagger-ui-bundle.js", headers={"Accept-Encoding": "gzip"})
    assert status == 200, body[:200]
    assert headers["Content-Encoding"] == "gzip", headers.items()
    original = (ui.swagger_ui_dir() / "swagger-ui-bundle.js").read_bytes()
    assert gzip.decompress(body) == original, "the gzipped script is not Swagger UI's"
    assert len(body) < len(original) / 2, f"gzip saved little: {len(body)} of {len(original)} bytes"
    assert headers["Cache-Control"] == ui.PINNED, headers.items()


# --- Client limits: slow clients, requests in flight, addresses behind a balancer ----------

# How long a test waits for nginx to cut a client off: far past the 1 s the test
# renders, and far short of nginx's own defaults (60 s; 75 s for keep-alive).
CUT_OFF_WITHIN = 30.0
# A byte every DRIBBLE_SECONDS: a client that is never idle, only slow.
DRIBBLE_SECONDS = 0.2


def wait_until_closed(client: socket.socket, within: float, dribble: bytes = b"") -> bytes | None:
    """Send ``dribble`` a byte at a time until the server closes; return what it sent, or None.

    None means the connection was still open after ``within`` seconds. A reset
    (reset_timedout_connection) counts as a close with nothing received.
    """
    deadline = time.monotonic() + within
    pending = iter(dribble)
    received = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([client], [], [], DRIBBLE_SECONDS)
        try:
            if readable:
                chunk = client.recv(65536)
                if not chunk:
                    return received
                received += chunk
            elif (byte := next(pending, None)) is not None:
                client.sendall(bytes([byte]))
        except (ConnectionResetError, BrokenPipeError):
            return received
    return None


def logged_statuses(proxy: Proxy, request_id: str) -> list[int]:
    """The statuses nginx logged for ``request_id`` (waiting a moment for the line)."""
    entries = proxy.log_entries(lambda es: any(e["request_id"] == request_id for e in es))
    return [entry["status"] for entry in entries if entry["request_id"] == request_id]


def test_a_client_sending_its_head_slowly_is_cut_off(worker_ports, tmp_path):
    """client_header_timeout bounds the whole head: a byte every 0.2 s does not keep it open."""
    request_id = uuid.uuid4().hex
    head = f"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Request-ID: {request_id}\r\n".encode()
    with running_nginx(tmp_path / "nginx", worker_ports, falcon_client_header_timeout="1s") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(head)
            received = wait_until_closed(client, CUT_OFF_WITHIN, dribble=b"X-Slow: " + b"a" * 1000)
        assert received is not None, f"nginx still read a dribbled request head after {CUT_OFF_WITHIN:.0f} s"
        assert b" 200 " not in received, f"the unfinished request was answered: {received[:200]!r}"
        assert logged_statuses(proxy, request_id) == [408], "nginx did not log the cut-off head as a 408"


def test_a_client_that_stops_sending_its_body_is_cut_off(worker_ports, tmp_path):
    """client_body_timeout: a body that stops arriving is dropped; no worker ever sees it."""
    request_id = uuid.uuid4().hex
    head = (
        f"POST /infer HTTP/1.1\r\nHost: test\r\nX-Request-ID: {request_id}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    with running_nginx(tmp_path / "nginx", worker_ports, falcon_client_body_timeout="1s") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(head + b'{"text": "only the start')
            received = wait_until_closed(client, CUT_OFF_WITHIN)
        assert received is not None, f"nginx still waited for the rest of a body after {CUT_OFF_WITHIN:.0f} s"
        entries = proxy.log_entries(lambda es: any(e["request_id"] == request_id for e in es))
    ours = [entry for entry in entries if entry["request_id"] == request_id]
    assert [entry["status"] for entry in ours] == [408], f"nginx did not log the stalled body as a 408: {ours}"
    assert ours[0]["upstream_addr"] == "", f"the unfinished body reached a worker: {ours[0]}"


def test_an_idle_keepalive_client_connection_is_closed(worker_ports, tmp_path):
    with (
        running_nginx(tmp_path / "nginx", worker_ports, falcon_client_keepalive_timeout="1s") as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client,
    ):
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = client.recv(65536)
            assert chunk, f"nginx closed before answering: {answer!r}"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert wait_until_closed(client, CUT_OFF_WITHIN) is not None, (
            f"an idle keep-alive client connection was still open after {CUT_OFF_WITHIN:.0f} s"
        )


def test_a_client_that_stops_reading_is_cut_off(worker_ports, tmp_path):
    """send_timeout: a client that asks for megabytes and reads none does not hold nginx for long."""
    prefix = uuid.uuid4().hex
    size = (ui.swagger_ui_dir() / "swagger-ui-bundle.js").stat().st_size
    # Pipelined requests for 1 MB each, more in all than the kernel buffers on loopback
    # (tcp_wmem's 4 MB at most on the sending side; the client's window is pinned small).
    pipelined = 12
    heads = "".join(
        f"GET /docs/swagger-ui-bundle.js HTTP/1.1\r\nHost: test\r\nX-Request-ID: {prefix}-{n}\r\n\r\n"
        for n in range(pipelined)
    )

    def cut_short(entries: list[dict]) -> bool:
        return any(e["request_id"].startswith(prefix) and e["bytes"] < size for e in entries)

    with running_nginx(tmp_path / "nginx", worker_ports, falcon_send_timeout="1s") as proxy:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", proxy.port))
            client.sendall(heads.encode())
            # nginx logs a request once it has sent it whole, or given up on sending.
            entries = proxy.log_entries(cut_short, CUT_OFF_WITHIN)
        ours = [entry for entry in entries if entry["request_id"].startswith(prefix)]
    assert cut_short(ours), (
        f"after {CUT_OFF_WITHIN:.0f} s nginx had cut off no response to a client that reads nothing: "
        f"{[(e['status'], e['bytes']) for e in ours]}"
    )


@dataclass
class HoldingWorker:
    """A fake upstream that keeps the first ``hold`` requests waiting and answers the rest at once."""

    port: int
    held: threading.Semaphore
    release: threading.Event


@contextmanager
def holding_worker(hold: int) -> Iterator[HoldingWorker]:
    """Listen like a worker; hold ``hold`` requests until ``release`` is set (always set on exit)."""
    held, release = threading.Semaphore(0), threading.Event()
    holding = threading.Semaphore(hold)
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"

    def answer(connection: socket.socket) -> None:
        with connection, suppress(OSError):
            connection.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                head += chunk
            if holding.acquire(blocking=False):
                held.release()
                release.wait(30)
            connection.sendall(reply)

    with fake_worker(answer) as port:
        try:
            yield HoldingWorker(port, held, release)
        finally:
            release.set()


def wait_held(worker: HoldingWorker, count: int) -> None:
    for n in range(count):
        assert worker.held.acquire(timeout=10), f"only {n} of {count} requests reached the worker"


def test_requests_in_flight_past_the_limit_get_json_429(tmp_path):
    limit = 2
    with (
        holding_worker(hold=limit) as worker,
        running_nginx(tmp_path / "nginx", [worker.port], falcon_conn_limit=limit) as proxy,
        ThreadPoolExecutor(limit) as pool,
    ):
        held = [pool.submit(call, proxy.port, "GET", "/healthz") for _ in range(limit)]
        wait_held(worker, limit)
        status, headers, body = call(proxy.port, "GET", "/healthz")
        worker.release.set()
        held_statuses = [future.result()[0] for future in held]
        after_status = call(proxy.port, "GET", "/healthz")[0]
    assert status == 429, f"request {limit + 1} in flight from one address was let through: {status} {body}"
    assert body == {
        "error": {
            "code": "too_many_requests",
            "message": "Too many requests in flight from this address; retry later.",
            "field": None,
        }
    }, body
    assert headers["Retry-After"] == "1" and HEX_ID.fullmatch(headers["X-Request-ID"]), headers.items()
    assert held_statuses == [200] * limit, f"the requests within the limit failed: {held_statuses}"
    assert after_status == 200, f"the limit did not free up once the requests finished: {after_status}"


@pytest.mark.parametrize(
    ("trusted", "client"),
    [
        (["127.0.0.1"], "192.0.2.5"),
        (["192.0.2.0/24", "127.0.0.0/8"], "203.0.113.9"),
        ([], "127.0.0.1"),
        (["192.0.2.0/24"], "127.0.0.1"),
    ],
    ids=["trusted-peer", "trusted-chain", "none-trusted", "peer-not-trusted"],
)
def test_client_address_comes_from_x_forwarded_for_only_via_a_trusted_balancer(worker_ports, tmp_path, trusted, client):
    """Each trusted hop names the address it saw; the rightmost untrusted one is the client.

    The header reads: what the client wrote itself (198.51.100.7), the client as the
    outer balancer saw it (203.0.113.9), that balancer as the inner one saw it
    (192.0.2.5); the inner one connects to nginx from 127.0.0.1.
    """
    request_id = uuid.uuid4().hex
    headers = {"X-Request-ID": request_id, "X-Forwarded-For": "198.51.100.7, 203.0.113.9, 192.0.2.5"}
    with running_nginx(tmp_path / "nginx", worker_ports, falcon_real_ip_from=trusted) as proxy:
        status, _, _ = fetch(proxy.port, "/healthz", headers=headers)
        entries = proxy.log_entries(lambda es: any(e["request_id"] == request_id for e in es))
    assert status == 200
    (entry,) = [e for e in entries if e["request_id"] == request_id]
    assert entry["remote_addr"] == client, f"trusting {trusted}, nginx took the client to be {entry['remote_addr']}"


def test_each_client_behind_a_trusted_balancer_has_its_own_limit(tmp_path):
    """Without real IP every client of the balancer would share one address's limit."""
    with (
        holding_worker(hold=1) as worker,
        running_nginx(
            tmp_path / "nginx", [worker.port], falcon_conn_limit=1, falcon_real_ip_from=["127.0.0.1"]
        ) as proxy,
        ThreadPoolExecutor(1) as pool,
    ):
        held = pool.submit(call, proxy.port, "GET", "/healthz", headers={"X-Forwarded-For": "203.0.113.9"})
        wait_held(worker, 1)
        other_client = call(proxy.port, "GET", "/healthz", headers={"X-Forwarded-For": "203.0.113.10"})[0]
        same_client = call(proxy.port, "GET", "/healthz", headers={"X-Forwarded-For": "203.0.113.9"})[0]
        worker.release.set()
        assert held.result()[0] == 200
    assert (other_client, same_client) == (200, 429), (
        f"a second client got {other_client} (want 200), the busy client's second request {same_client} (want 429)"
    )


@contextmanager
def raw_upstream(answer: bytes | None) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """A one-request-per-connection HTTP upstream that records each request's headers.

    ``answer`` is sent back; None closes the connection unanswered, as a unit killed
    mid-request does, which nginx retries on the next unit.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[dict[str, str]] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
                seen.append({k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)})
                if answer is not None:
                    connection.sendall(answer)
                else:
                    # Die a little later, so a header nginx rebuilt for the retry would show a later $msec.
                    time.sleep(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        listener.close()


def test_a_request_retried_on_another_unit_carries_the_same_proxy_request_header(tmp_path):
    """nginx builds the upstream request once: the unit it retries on sees the id and time the first one saw."""
    body = b'{"ok": true}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    answer += f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    with (
        raw_upstream(None) as (dying_port, dying_seen),
        raw_upstream(answer) as (good_port, good_seen),
        running_nginx(tmp_path / "nginx", [dying_port, good_port]) as proxy,
    ):
        statuses = [call(proxy.port, "POST", "/infer", {"text": f"retry {i}"})[0] for i in range(6)]
    assert statuses == [200] * 6, statuses
    assert dying_seen, "nginx never tried the unit that dies mid-request"
    retried = {h["x-request-id"]: h["x-falcon-proxy-request"] for h in dying_seen}
    answered = {h["x-request-id"]: h["x-falcon-proxy-request"] for h in good_seen}
    assert all(answered[request_id] == value for request_id, value in retried.items()), (retried, answered)
    assert all(re.fullmatch(r"[0-9a-f]{32} [0-9]{10}\.[0-9]{3}", value) for value in answered.values()), answered
    assert len(set(answered.values())) == 6, "each client request has its own"
