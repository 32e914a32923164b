"""TLS to Redis that trusts only the configured CA, with one SSL context per CA file.

redis-py's ``SSLConnection`` builds a fresh ``ssl.create_default_context()`` for every
connection: that loads the system's CA store (26 ms of CPU here, `python -m timeit
"ssl.create_default_context()"`, spent on the request path at each connect and
reconnect) and trusts every public CA beside
``ssl_ca_certs``. A ``rediss://`` URL with ``ssl_ca_certs`` (what the Ansible role
writes) means "the data host's certificate, signed by our CA": this connection class
trusts that CA alone and builds its context once.
"""

from __future__ import annotations

import functools
import socket
import ssl

from redis.connection import SSLConnection


@functools.lru_cache(maxsize=8)
def pinned_context(ca_file: str, check_hostname: bool, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    """Return the client context that trusts only ``ca_file``, TLS 1.2 or newer.

    NOTE: cached for the process's life: a new CA file is read by new workers (the
    Ansible role restarts them when it changes the file).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=ca_file)
    context.check_hostname = check_hostname
    context.verify_mode = verify_mode
    return context


class PinnedCATLSConnection(SSLConnection):
    """An ``SSLConnection`` that verifies against ``ssl_ca_certs`` only.

    Any option this class does not handle (client certificates, a CA directory or data,
    OCSP, ciphers, verify flags) leaves the connection to redis-py's own code.
    """

    def _wrap_socket_with_ssl(self, sock: socket.socket) -> ssl.SSLSocket:
        if self.ca_certs is None or self._has_other_tls_options():
            wrapped: ssl.SSLSocket = super()._wrap_socket_with_ssl(sock)  # type: ignore[no-untyped-call]
            return wrapped
        context = pinned_context(self.ca_certs, bool(self.check_hostname), ssl.VerifyMode(self.cert_reqs))
        return context.wrap_socket(sock, server_hostname=self.host)

    def _has_other_tls_options(self) -> bool:
        return any(
            (
                self.certfile,
                self.keyfile,
                self.ca_path,
                self.ca_data,
                self.ssl_validate_ocsp,
                self.ssl_validate_ocsp_stapled,
                self.ssl_min_version,
                self.ssl_ciphers,
                self.ssl_include_verify_flags,
                self.ssl_exclude_verify_flags,
            )
        )
