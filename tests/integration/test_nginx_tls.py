"""HTTPS in nginx/falcon-svc.conf.j2, served by a real nginx with a throw-away certificate.

TLS 1.2 and 1.3 only with strong suites, plain HTTP redirected with 308 to the https
port (except requests sent to the host's own loopback address, which the operator's
scripts use), HSTS only when redirecting, and the same answers over HTTPS as over HTTP.

nginx listens on 127.0.0.2 where a test needs a "public" address: a connection made
to it is not one the template exempts from the redirect (127.0.0.1 and ::1 are).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from servers import free_port, stop_process
from test_nginx import TEMPLATE, WEB_ROOT, Proxy, TlsFiles, json_worker, render, running_nginx, wait_for_address
from tools import require_tool

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
NGINX_ROLE = REPO_ROOT / "ansible" / "roles" / "nginx"
# A relative ANSIBLE_BIN_DIR is taken from the repo root, as in tests/ops/test_ansible.py.
ANSIBLE_BIN_DIR = REPO_ROOT / os.environ.get("ANSIBLE_BIN_DIR", ".venv-deploy/bin")
PUBLIC_HOST = "127.0.0.2"
HSTS = "max-age=63072000"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed RSA certificate for both loopback addresses, made by openssl.

    RSA on purpose: with an RSA key nginx could also offer the old RSA key-exchange
    and CBC suites, so the weak-suite test sees what ssl_ciphers allows.
    """
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles(certificate=directory / "cert.pem", key=directory / "key.pem")
    subprocess.run(
        [
            require_tool("openssl", "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=falcon-svc test", "-addext", f"subjectAltName=IP:127.0.0.1,IP:{PUBLIC_HOST}",
            "-keyout", str(files.key), "-out", str(files.certificate),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return files


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with json_worker() as port:
        yield port


@pytest.fixture(scope="module")
def public_proxy(upstream, tls_files, tmp_path_factory) -> Iterator[Proxy]:
    """nginx with TLS and the redirect on, reached on a non-exempt address."""
    with running_nginx(tmp_path_factory.mktemp("nginx"), [upstream], host=PUBLIC_HOST, tls=tls_files) as proxy:
        yield proxy


def client_context(tls_files: TlsFiles, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A verifying client context that trusts only the test certificate (one TLS version if given)."""
    context = ssl.create_default_context(cafile=str(tls_files.certificate))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request over HTTP, or HTTPS with ``context``; never follows a redirect."""
    connection = (
        http.client.HTTPSConnection(host, port, timeout=10, context=context)
        if context
        else http.client.HTTPConnection(host, port, timeout=10)
    )
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def https(
    proxy: Proxy, tls_files: TlsFiles, method: str, path: str, body: bytes | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request to ``proxy``'s https port, verifying its certificate."""
    return request(proxy.host, proxy.https_port, method, path, body, client_context(tls_files))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"])
def test_tls_12_and_13_handshakes_succeed_with_a_strong_suite(public_proxy, tls_files, version):
    context = client_context(tls_files, version)
    with (
        socket.create_connection((PUBLIC_HOST, public_proxy.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=PUBLIC_HOST) as tls,
    ):
        negotiated, (suite, _, _) = tls.version(), tls.cipher()
    assert negotiated == version.name.replace("_", "."), f"asked for {version.name}, got {negotiated}"
    # TLS 1.3 suites are all AEAD; a TLS 1.2 one must be ECDHE with GCM or ChaCha20.
    assert suite.startswith("TLS_") or (suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite)), suite
    status, headers, body = request(PUBLIC_HOST, public_proxy.https_port, "GET", "/healthz", context=context)
    assert status == 200 and json.loads(body)["target"] == "/healthz", (status, body[:200])
    assert headers["Strict-Transport-Security"] == HSTS, headers.items()


def old_protocol_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that really offers TLS 1.0 or 1.1: OpenSSL 3 refuses them below security level 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl deprecates the old versions
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("ALL:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = version
    return context


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_tls_10_and_11_are_refused(public_proxy, version):
    context = old_protocol_context(version)
    with (
        socket.create_connection((PUBLIC_HOST, public_proxy.https_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as refused,
    ):
        context.wrap_socket(raw, server_hostname=PUBLIC_HOST).close()
    # The server's protocol_version alert, not a client that could not even offer the version.
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value) or "UNSUPPORTED_PROTOCOL" in str(refused.value), refused


@pytest.mark.parametrize("suite", ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA"])
def test_weak_tls_12_suites_are_refused(public_proxy, suite):
    """No static-RSA key exchange (no forward secrecy), no CBC: each of these is refused alone."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    with (
        socket.create_connection((PUBLIC_HOST, public_proxy.https_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|NO_SHARED_CIPHER"),
    ):
        context.wrap_socket(raw, server_hostname=PUBLIC_HOST).close()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_plain_http_is_redirected_with_308_to_the_https_port(public_proxy, tls_files, method):
    body = b'{"text": "redirect me"}' if method == "POST" else None
    status, headers, _ = request(PUBLIC_HOST, public_proxy.port, method, "/infer?x=1", body)
    location = f"https://{PUBLIC_HOST}:{public_proxy.https_port}/infer?x=1"
    assert (status, headers["Location"]) == (308, location), (status, headers.items())
    assert "Strict-Transport-Security" not in headers, "HSTS sent over plain HTTP"
    assert headers["X-Request-ID"], "the redirect lacks the X-Request-ID every reply carries"
    # 308 keeps the method and body: followed, the same POST reaches the worker.
    status, _, answer = https(public_proxy, tls_files, method, "/infer?x=1", body)
    assert status == 200 and json.loads(answer) == {
        "method": method,
        "target": "/infer?x=1",
        "body_bytes": len(body or b""),
    }, answer


def test_a_request_without_host_is_redirected_to_the_address_it_reached(public_proxy):
    with socket.create_connection((PUBLIC_HOST, public_proxy.port), timeout=10) as client:
        client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 308 "), head
    assert f"\r\nLocation: https://{PUBLIC_HOST}:{public_proxy.https_port}/healthz" in head, head


@pytest.mark.parametrize("path", ["/metrics", "/metrics/", "/METRICS", "/%6detrics"])
def test_worker_metrics_are_not_public_over_https(public_proxy, tls_files, path):
    status, headers, body = https(public_proxy, tls_files, "GET", path)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found", (status, body[:200])
    assert headers["Strict-Transport-Security"] == HSTS, headers.items()


@pytest.mark.parametrize(("path", "status"), [("/", 200), ("/static/app.js", 200), ("/", 405)])
def test_locations_with_their_own_headers_keep_hsts(public_proxy, tls_files, path, status):
    """An add_header in a location drops the server's: each such location repeats HSTS."""
    method = "POST" if status == 405 else "GET"
    got, headers, _ = https(public_proxy, tls_files, method, path)
    assert got == status and headers["Strict-Transport-Security"] == HSTS, (method, path, got, headers.items())


def test_plain_http_to_loopback_is_served_not_redirected(upstream, tls_files, tmp_path):
    """The operator's scripts and the fault drills use http://127.0.0.1 on the host."""
    with running_nginx(tmp_path / "nginx", [upstream], host="127.0.0.1", tls=tls_files) as proxy:
        status, headers, body = request("127.0.0.1", proxy.port, "POST", "/infer", b'{"text": "local"}')
    assert status == 200 and json.loads(body)["method"] == "POST", (status, headers.items(), body[:200])
    assert "Strict-Transport-Security" not in headers, headers.items()


def test_redirect_off_serves_plain_http_and_no_hsts(upstream, tls_files, tmp_path):
    with running_nginx(
        tmp_path / "nginx", [upstream], host=PUBLIC_HOST, tls=tls_files, falcon_http_redirect=False
    ) as proxy:
        plain = request(PUBLIC_HOST, proxy.port, "GET", "/healthz")
        secure = https(proxy, tls_files, "GET", "/healthz")
    for scheme, (status, headers, body) in (("http", plain), ("https", secure)):
        assert status == 200 and json.loads(body)["target"] == "/healthz", (scheme, status, body[:200])
        assert "Strict-Transport-Security" not in headers, f"HSTS over {scheme} without the redirect"


def test_every_request_over_https_is_logged_with_its_request_id(public_proxy, tls_files):
    request_id = uuid.uuid4().hex
    connection = http.client.HTTPSConnection(
        PUBLIC_HOST, public_proxy.https_port, timeout=10, context=client_context(tls_files)
    )
    try:
        connection.request("GET", "/healthz", headers={"X-Request-ID": request_id})
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    entries = public_proxy.log_entries(lambda es: any(e["request_id"] == request_id for e in es))
    assert [e["status"] for e in entries if e["request_id"] == request_id] == [200], entries[-3:]


def rendered(**variables: object) -> str:
    """The template rendered with placeholder values, and ``variables``."""
    return render(
        TEMPLATE.read_text(),
        {name: "x" for name in re.findall(r"\{\{ (falcon_\w+) \}\}", TEMPLATE.read_text())}
        | {"ansible_managed": "m", "falcon_upstream_servers": ["127.0.0.1:8001"], "falcon_real_ip_from": []}
        | {"falcon_plain_http_addresses": ["127.0.0.1"]}
        | variables,
    )


def test_tls_off_renders_plain_http_only():
    text = rendered(falcon_tls_enabled=False, falcon_http_redirect=True)
    assert " ssl;" not in text and "ssl_certificate" not in text and "return 308" not in text, "TLS parts left in"
    assert '"max-age' not in text, "HSTS rendered without TLS"


def role_tasks(name: str) -> list[dict]:
    """The tasks of the role's ``name``.yml, without their notify: no handler may touch this machine's nginx."""
    tasks = yaml.safe_load((NGINX_ROLE / "tasks" / f"{name}.yml").read_text())
    for task in tasks:
        task.pop("notify", None)
    return tasks


def role_playbook(directory: Path, variables: dict[str, object]) -> Path:
    """A play on localhost: the role's preflight (and defaults), TLS and site tasks; the site goes to ``directory``."""
    configure = role_tasks("configure")
    (render_task,) = [task for task in configure if "ansible.builtin.template" in task]
    render_task["ansible.builtin.template"]["dest"] = str(directory / "falcon-svc.conf")
    # The site includes the rate-limit exemptions file: the role writes it (to nginx_unlimited_clients_file).
    (unlimited_task,) = [t for t in configure if "nginx_unlimited_clients_file" in str(t.get("ansible.builtin.copy"))]
    variables = {"nginx_unlimited_clients_file": str(directory / "unlimited.conf")} | variables
    preflight = {
        "name": "Check the inputs",
        "ansible.builtin.include_role": {"name": "nginx", "tasks_from": "preflight.yml", "public": True},
    }
    play = {
        "name": "The nginx role's TLS tasks and site on this machine, in a temp dir",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": True,
        "vars": variables,
        "tasks": [preflight, *role_tasks("tls"), unlimited_task, render_task],
    }
    playbook = directory / "play.yml"
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    return playbook


def run_playbook(playbook: Path) -> str:
    binary = ANSIBLE_BIN_DIR / "ansible-playbook"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} not found: run `make deploy-tools` (or set ANSIBLE_BIN_DIR)")
    env = os.environ | {"ANSIBLE_ROLES_PATH": str(NGINX_ROLE.parent), "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(
        [str(binary), "-i", "localhost,", "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)],
        capture_output=True, text=True, timeout=300, check=False, env=env, cwd=playbook.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes the key root's (chown)")
def test_the_role_generates_a_certificate_and_a_site_that_nginx_serves(upstream, tmp_path):
    """The real Jinja render and the role's openssl task, served by nginx: TLS verifies against the new certificate."""
    tls_dir, http_port, https_port = tmp_path / "tls", free_port(), free_port()
    playbook = role_playbook(
        tmp_path,
        {
            "nginx_site_template": str(TEMPLATE),
            "nginx_worker_ports": [upstream],
            "nginx_listen": f"{PUBLIC_HOST}:{http_port}",
            "nginx_https_port": https_port,
            "nginx_status_port": free_port(),
            "nginx_web_root": str(WEB_ROOT),
            "nginx_tls_certificate_path": str(tls_dir / "falcon-svc.crt"),
            "nginx_tls_key_path": str(tls_dir / "falcon-svc.key"),
            "falcon_nginx_access_log": str(tmp_path / "access.log"),
        },
    )
    first = run_playbook(playbook)
    assert "changed: [localhost]" in first, first[-2000:]
    again = run_playbook(playbook)
    assert re.search(r"localhost\s+:.*changed=0 ", again), f"a second run changed something:\n{again[-2000:]}"
    certificate, key = tls_dir / "falcon-svc.crt", tls_dir / "falcon-svc.key"
    assert (tls_dir.stat().st_mode & 0o777, key.stat().st_mode & 0o777) == (0o700, 0o600), "key or its dir readable"
    names = subprocess.run(
        ["openssl", "x509", "-in", str(certificate), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert f"DNS:{socket.gethostname()}" in names and "IP Address:127.0.0.1" in names, names
    site = tmp_path / "falcon-svc.conf"
    main_conf = tmp_path / "nginx.conf"
    temp_paths = "".join(f"{kind}_temp_path {tmp_path / kind}; " for kind in ("client_body", "proxy"))
    main_conf.write_text(
        f"user root; worker_processes 1; pid {tmp_path / 'nginx.pid'};\nevents {{ worker_connections 64; }}\n"
        f"http {{ access_log off; {temp_paths}\ninclude {site};\n}}\n"
    )
    command = [require_tool("nginx", "nginx"), "-c", str(main_conf), "-p", str(tmp_path), "-e", str(tmp_path / "e.log")]
    process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_address(PUBLIC_HOST, https_port, within=10)
        status, headers, _ = request(PUBLIC_HOST, http_port, "GET", "/healthz")
        assert (status, headers["Location"]) == (308, f"https://{PUBLIC_HOST}:{https_port}/healthz"), headers.items()
        # Verified against the new certificate by a name in its subjectAltName.
        context = client_context(TlsFiles(certificate=certificate, key=key))
        with (
            socket.create_connection((PUBLIC_HOST, https_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert f"\r\nStrict-Transport-Security: {HSTS}\r\n".encode() in answer, answer[:300]
    finally:
        stop_process(process, timeout=10)


def test_the_role_passes_every_variable_the_template_uses():
    """Each variable of the template (save those with a default) is set by the role's site task."""
    text = TEMPLATE.read_text()
    used = set(re.findall(r"\{\{ (falcon_\w+) (?!\| default)", text)) | set(
        re.findall(r"\{% (?:if|for \w+ in) (falcon_\w+)", text)
    )
    (render_task,) = [
        task
        for task in yaml.safe_load((NGINX_ROLE / "tasks" / "configure.yml").read_text())
        if "ansible.builtin.template" in task
    ]
    missing = used - set(render_task["vars"])
    assert {"falcon_tls_enabled", "falcon_http_redirect"} <= used, f"the pattern misses the template's ifs: {used}"
    assert not missing, f"the role does not pass {sorted(missing)} to the template"
