"""An httpx transport whose connections go to the address that was checked.

httpx resolves a name when it connects; checking the name before and letting httpx resolve it
again would let a second answer (DNS rebinding) send the request to a private address. Here
the connection pool's network backend resolves once, checks every answer
(:class:`.addresses.AddressPolicy`) and connects to a checked address. TLS still verifies the
certificate against the URL's host name (SNI) and the ``Host`` header is the URL's: only the
TCP destination is pinned. No proxy from the environment, no redirects (the client's)."""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx

from orchestrator.webhooks.addresses import AddressPolicy, Refused, Resolver, system_resolver

LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=50)


class CheckedBackend(httpcore.SyncBackend):
    def __init__(self, policy: AddressPolicy, resolver: Resolver) -> None:
        self._policy = policy
        self._resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._policy.checked_addresses(self._resolver, host, port)
        options = list(socket_options or [])
        last: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(str(address), port, timeout, local_address, options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        assert last is not None
        raise last


class CheckedTransport(httpx.HTTPTransport):
    """:class:`httpx.HTTPTransport` with :class:`CheckedBackend` under its pool."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits = LIMITS,
    ) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedBackend(policy, resolver),
        )


__all__ = ["CheckedBackend", "CheckedTransport", "Refused"]
