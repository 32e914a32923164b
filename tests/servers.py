"""Real servers for integration tests: redis-server and PostgreSQL on free loopback ports.

Each runs from a temp dir and can be stopped and started again on the same port,
so tests can kill a dependency mid-run and bring it back. Either can serve TLS with
certificates made here by the openssl CLI (``make_server_tls``), as the Ansible roles
configure them on a fleet.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools import require_tool


def free_port() -> int:
    """Return a TCP port nobody listens on right now (never a standard one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a test's process: SIGCONT (a test may have paused it), SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_port(port: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {within} s")


def process_state(pid: int) -> str:
    """Return the one-letter state of a process from /proc (R, S, T for stopped, ...)."""
    # NOTE: the command name in parentheses may hold spaces; the state follows it.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def pause_process(pid: int, within: float = 10.0) -> None:
    """SIGSTOP a process and wait until it really is stopped: a hung server, not a dead one.

    A zombie (a PostgreSQL backend that exited while its paused postmaster cannot
    reap it) runs no more either: it counts as stopped.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + within
    while process_state(pid) not in {"T", "t", "Z", "X"}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop within {within} s")
        time.sleep(0.01)


def resume_process(pid: int) -> None:
    """SIGCONT a process paused by ``pause_process`` (gone already is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS files (PEM): the CA certificate that signed it, its certificate and its private key."""

    ca_cert: Path
    cert: Path
    key: Path


def _openssl(directory: Path, *args: str | Path) -> None:
    """Run openssl in ``directory``; on failure, raise with what it printed (CalledProcessError would hide it)."""
    command = [require_tool("openssl", "openssl"), *map(str, args)]
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({result.returncode}): {result.stderr.strip()}")


# EC P-256: a key in milliseconds (an RSA one takes up to a second), and what every client supports.
_NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def make_ca(directory: Path, name: str = "test-ca") -> tuple[Path, Path]:
    """Make a CA valid for 2 days in ``directory``; return its certificate and key (``name``.crt, ``name``.key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        directory, "req", "-x509", *_NEW_EC_KEY, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", key, "-out", cert,
    )  # fmt: skip
    return cert, key


def make_server_tls(directory: Path, names: str = "IP:127.0.0.1,DNS:localhost") -> TlsFiles:
    """Make a CA and a server certificate it signs for ``names`` (a subjectAltName value), for serverAuth.

    NOTE: clients that verify the name (sslmode=verify-full, ssl_check_hostname)
    match an address against an IP entry, never against the CN: hence the IP SAN.
    """
    ca_cert, ca_key = make_ca(directory)
    key, request, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    _openssl(directory, "req", "-new", *_NEW_EC_KEY, "-subj", "/CN=localhost", "-keyout", key, "-out", request)
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    )
    _openssl(
        directory, "x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
        "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return TlsFiles(ca_cert, cert, key)


class RedisServer:
    """A redis-server process owned by a test.

    With ``tls``, it speaks only TLS on ``port`` (``port 0``, ``tls-port``), as the
    redis role configures it; ``config`` lines (ACL ``user`` lines, say) go into a
    redis.conf it reads first.
    """

    def __init__(self, directory: Path, *, tls: TlsFiles | None = None, config: Sequence[str] = ()) -> None:
        self._binary = require_tool("redis-server", "redis-server")
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        self.config = list(config)
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _config_file(self) -> list[str]:
        """Write redis.conf with the TLS and extra lines; return the arguments naming it (none without any)."""
        lines = list(self.config)
        if self.tls is not None:
            # The redis role's TLS lines (ansible/roles/redis/vars/main.yml, _redis_tls_settings).
            lines += [
                f"tls-port {self.port}",
                f'tls-cert-file "{self.tls.cert}"',
                f'tls-key-file "{self.tls.key}"',
                f'tls-ca-cert-file "{self.tls.ca_cert}"',
                "tls-auth-clients no",
                'tls-protocols "TLSv1.2 TLSv1.3"',
            ]
        if not lines:
            return []
        config = self.directory / "redis.conf"
        config.write_text("\n".join(lines) + "\n")
        return [str(config)]

    def start(self) -> None:
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                self._binary,
                *self._config_file(),  # NOTE: first: the options below override what it says
                "--port", "0" if self.tls else str(self.port),  # TLS only: no plain-TCP port
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--protected-mode", "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_port(self.port)

    def pause(self) -> None:
        """SIGSTOP the server: connections still open (the kernel accepts them) but nothing answers."""
        assert self._process is not None, "the server is not running"
        pause_process(self._process.pid)

    def resume(self) -> None:
        """SIGCONT the server paused by ``pause``."""
        if self._process is not None:
            resume_process(self._process.pid)

    def stop(self) -> None:
        """Kill the server (SIGKILL: a crash, not a clean shutdown)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)
        self._process = None


class PostgresServer:
    """A PostgreSQL cluster made with initdb in a temp dir, run by pg_ctl."""

    def __init__(self, directory: Path) -> None:
        # initdb, pg_ctl and createdb of one version, from its own directory.
        self._bin = Path(require_tool("initdb", "postgresql", ("/usr/lib/postgresql/*/bin",))).resolve().parent
        self.port = free_port()
        self._owned_dir: Path | None = None
        # NOTE: PostgreSQL refuses to run as root; CI runs as root, so the
        # cluster belongs to the postgres system user there, in a directory of
        # its own (pytest's temp dirs are private to root).
        self._runas: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            directory = self._owned_dir = Path(tempfile.mkdtemp(prefix="falcon-pg-"))
            os.chown(directory, user.pw_uid, user.pw_gid)
            self._runas = [require_tool("runuser", "util-linux"), "-u", "postgres", "--"]
        self.directory = directory
        self.data = directory / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/falcon"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._runas, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(str(self._bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        self._run(str(self._bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "falcon")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self._bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.directory / "pg.log"), "-w",
            "start",
        )  # fmt: skip
        wait_for_port(self.port)

    def enable_tls(self, tls: TlsFiles, hba: Sequence[str]) -> None:
        """Serve ``tls`` (TLS 1.2 or newer) with ``hba`` as the whole pg_hba.conf, as the postgresql role does; restart.

        NOTE: PostgreSQL refuses a key file that others may read or that the
        server's user does not own: the certificate and key are copied into the
        cluster's directory, owned by that user (postgres when the tests run as
        root), the key 0600. A restart, not ``pg_ctl reload``: reload only
        signals, so a connection right after it might still meet the old settings.
        """
        owner = self.directory.stat()
        for source, name, mode in ((tls.cert, "server.crt", 0o644), (tls.key, "server.key", 0o600)):
            target = self.directory / name
            shutil.copyfile(source, target)
            os.chmod(target, mode)
            os.chown(target, owner.st_uid, owner.st_gid)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "ssl = on\n"
                f"ssl_cert_file = '{self.directory / 'server.crt'}'\n"
                f"ssl_key_file = '{self.directory / 'server.key'}'\n"
                "ssl_min_protocol_version = 'TLSv1.2'\n"
            )
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")  # NOTE: the file exists: its owner stays
        self.stop("fast")
        self.start()

    def postmaster_pid(self) -> int:
        """Return the pid of the running postmaster (first line of postmaster.pid)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def _children(self, postmaster: int) -> list[int]:
        return [int(pid) for pid in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()]

    def pause(self) -> None:
        """SIGSTOP the postmaster, then each of its children: a hung server, every backend included.

        NOTE: every PostgreSQL child calls setsid(), so no process group holds them
        all; the postmaster is stopped first, so that it forks no child meanwhile.
        Call ``resume`` before ``stop`` or ``destroy``: pg_ctl cannot stop a paused server.
        """
        postmaster = self.postmaster_pid()
        pause_process(postmaster)
        for child in self._children(postmaster):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                pause_process(child)

    def resume(self) -> None:
        """SIGCONT the children, then the postmaster (harmless when nothing is paused or running)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            postmaster = self.postmaster_pid()
            for pid in [*self._children(postmaster), postmaster]:
                resume_process(pid)

    def stop(self, mode: str = "immediate") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server and remove its files."""
        self.stop()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
