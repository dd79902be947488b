"""Where a webhook may go (SSRF): ``https://`` unless the host is allow-listed, and every
address the name resolves to either public (``is_global``: no loopback, private, link-local,
cloud metadata, CGNAT, multicast or reserved range) or inside an allow-listed network. The
check runs on the resolved addresses, in :mod:`.transport`, which then connects to exactly the
address it checked."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from orchestrator.errors import OrchestratorError
from orchestrator.webhooks.settings import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) → addresses; the sender uses getaddrinfo, tests a resolver of their own.
Resolver = Callable[[str, int], Sequence[str]]


class Refused(OrchestratorError):
    """A receiver the policy does not allow; the message says why, never a secret."""

    shown_as = ""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressPolicy:
    def __init__(
        self, allowed_hosts: frozenset[str] = frozenset(), allowed_networks: Sequence[Network] = ()
    ) -> None:
        self.allowed_hosts = allowed_hosts
        self.allowed_networks = tuple(allowed_networks)

    def check_url(self, url: str) -> None:
        """Refuse a URL that cannot be sent to: not http(s), credentials in it, or plain HTTP
        to a host not allow-listed."""
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise Refused("a webhook URL must be https://host/…")
        if parts.username is not None or parts.password is not None:
            raise Refused("a webhook URL may not carry credentials (user:password@)")
        if parts.scheme == "http" and not self.host_allowed(parts.hostname):
            raise Refused(
                f"plain http to {parts.hostname} is refused: use https, or allow-list the host"
                " (ORCHESTRATOR_WEBHOOK_ALLOW)"
            )

    def host_allowed(self, host: str) -> bool:
        host = host.lower().strip("[]")
        if host in self.allowed_hosts:
            return True
        try:
            return self._in_allowed_network(ipaddress.ip_address(host))
        except ValueError:
            return False

    def check_address(self, address: str) -> IPAddress:
        """The address, if a connection may go there; else :class:`Refused`."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        public = ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)
        if public or self._in_allowed_network(ip):
            return ip
        raise Refused(f"address {ip} is not public and not allow-listed")

    def _in_allowed_network(self, ip: IPAddress) -> bool:
        return any(
            ip.version == n.version
            and int(n.network_address) <= int(ip) <= int(n.broadcast_address)
            for n in self.allowed_networks
        )

    def checked_addresses(self, resolver: Resolver, host: str, port: int) -> list[IPAddress]:
        """Resolve once; every answer must pass (a name mixing public and private answers is
        refused whole)."""
        try:
            answers = list(resolver(host, port))
        except OSError as error:
            raise Refused(f"cannot resolve {host}: {error.strerror or error}") from None
        if not answers:
            raise Refused(f"{host} resolves to no address")
        return [self.check_address(a) for a in answers]
