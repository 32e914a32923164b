"""Decide who may see internal detail: ``/metrics``, ``/readyz``'s detail, ``/v1/models``' metadata.

A request is internal when its peer address (the socket's, never a header) is
in METRICS_ALLOWED_NETWORKS (loopback by default: Prometheus, check_health.sh
and operators on the host) and no proxy relayed it. Everyone else gets the
public answer: 404 for ``/metrics``, status only on ``/readyz``.

NOTE: nginx on the host connects from 127.0.0.1, so by address alone every
public request it relays would look local. nginx always sets X-Forwarded-For and
X-Real-IP (nginx/falcon-svc.conf.j2), so a request carrying either, or
Forwarded, is public whatever its peer. A client gains nothing by sending them:
they can only take access away. nginx also refuses /metrics itself; each layer
holds without the other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Set by a reverse proxy; the app must not trust a relayed request as local.
PROXY_HEADERS = ("FORWARDED", "X-FORWARDED-FOR", "X-REAL-IP")


def parse_networks(spec: str) -> tuple[Network, ...]:
    """Parse comma-separated CIDR networks (``"127.0.0.0/8,::1/128"``); raise ValueError on a bad one."""
    networks = []
    for item in spec.split(","):
        if item.strip():
            networks.append(ipaddress.ip_network(item.strip(), strict=True))
    return tuple(networks)


class InternalAccess:
    """Tell an internal request (allowed network, not relayed) from a public one."""

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self._networks = networks

    def allows(self, remote_addr: str, headers: Mapping[str, str]) -> bool:
        """Return True when ``remote_addr`` is in an allowed network and no proxy header is present.

        ``headers`` are upper-case names, as ``falcon.Request.headers`` gives them.
        A peer that is not an IP address (a unix socket's) is refused: fail closed.
        """
        if any(name in headers for name in PROXY_HEADERS):
            return False
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)
