"""An httpx transport whose connections go to the address that was checked.

httpx resolves a name when it connects; checking the name before and letting httpx resolve it
again would let a second answer (DNS rebinding) send the request to a private address. Here
the connection pool's network backend resolves once, checks every answer
(:class:`.addresses.AddressPolicy`) and connects to a checked address. TLS still verifies the
certificate against the URL's host name (SNI) and the ``Host`` header is the URL's: only the
TCP destination is pinned. No proxy from the environment, no redirects (the client's).

The pool is :class:`KeepAlivePool`, not httpcore's: idle connections kept per origin, taken
last in first out, under a lock held for a list operation. httpcore's one pool takes its lock
three times per request and scans every connection (every endpoint's, a dead endpoint's 16
among them) each time: about half of httpx's cost in the sender, which is CPU bound. The
connections themselves are httpcore's (h11), made through :class:`CheckedBackend` as before;
how many are in use at once is bounded by the sender (its threads, its slots per endpoint)."""

from __future__ import annotations

import ssl
import threading
import time
import typing
from collections.abc import Iterator

import httpcore
import httpx

from orchestrator.webhooks.addresses import AddressPolicy, Refused, Resolver, system_resolver

LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=50)
SWEEP_SECONDS = 1.0  # how often idle connections of every origin are looked at for expiry

_Key = tuple[bytes, bytes, int]  # an origin: scheme, host, port (httpcore.Origin is unhashable)


def _key(origin: httpcore.Origin) -> _Key:
    return (origin.scheme, origin.host, origin.port)


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


class KeepAlivePool(httpcore.ConnectionPool):
    """Keep-alive HTTP/1.1 connections, idle ones kept per origin (last in, first out).

    A request takes an idle connection of its origin (one that has neither expired nor been
    closed by the server: httpcore's own check) or makes one through the network backend;
    the connection goes back when its response is closed, if h11 left it reusable (the whole
    answer read), else it is closed. At most ``max_keepalive_connections`` idle in all (one
    more is closed, not kept); idle ones past ``keepalive_expiry`` are closed at most
    :data:`SWEEP_SECONDS` later. A kept connection the server closed under a request that
    could not start on it is replaced once by a new one, as httpcore's pool does."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        network_backend: httpcore.NetworkBackend,
        max_keepalive_connections: int,
        keepalive_expiry: float | None,
    ) -> None:
        super().__init__(ssl_context=ssl_context, network_backend=network_backend)
        self._context = ssl_context
        self._backend = network_backend
        self._keep = max_keepalive_connections
        self._expiry = keepalive_expiry
        self._idle: dict[_Key, list[httpcore.HTTPConnection]] = {}
        self._idle_count = 0
        self._closed = False
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        origin = request.url.origin
        self._sweep()
        connection = self._take(_key(origin))
        if connection is not None:
            try:
                return self._send(connection, request)
            except httpcore.ConnectionNotAvailable:
                pass  # closed since it was checked: a new connection, once
        connection = httpcore.HTTPConnection(
            origin=origin,
            ssl_context=self._context,
            keepalive_expiry=self._expiry,
            network_backend=self._backend,
        )
        return self._send(connection, request)

    def _send(
        self, connection: httpcore.HTTPConnection, request: httpcore.Request
    ) -> httpcore.Response:
        try:
            response = connection.handle_request(request)
        except BaseException:
            connection.close()
            raise
        assert isinstance(response.stream, typing.Iterable)
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_Returning(self, _key(request.url.origin), connection, response.stream),
            extensions=response.extensions,
        )

    def _take(self, key: _Key) -> httpcore.HTTPConnection | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                connection = idle.pop()
                self._idle_count -= 1
            if connection.is_idle() and not connection.has_expired():
                return connection
            connection.close()

    def _give_back(self, key: _Key, connection: httpcore.HTTPConnection) -> None:
        if connection.is_idle():
            with self._lock:
                if not self._closed and self._idle_count < self._keep:
                    self._idle.setdefault(key, []).append(connection)
                    self._idle_count += 1
                    return
        connection.close()

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < SWEEP_SECONDS:
            return
        expired: list[httpcore.HTTPConnection] = []
        with self._lock:
            self._swept = now
            for origin, idle in list(self._idle.items()):
                kept = [c for c in idle if not c.has_expired()]
                expired.extend(c for c in idle if c not in kept)
                self._idle_count -= len(idle) - len(kept)
                if kept:
                    self._idle[origin] = kept
                else:
                    del self._idle[origin]
        for connection in expired:
            connection.close()

    @property
    def connections(self) -> list[httpcore.ConnectionInterface]:
        """The idle connections kept (those in use belong to their responses)."""
        with self._lock:
            return [c for idle in self._idle.values() for c in idle]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [c for kept in self._idle.values() for c in kept]
            self._idle.clear()
            self._idle_count = 0
        for connection in idle:
            connection.close()


class _Returning:
    """A response's body; closing it hands the connection back to the pool."""

    def __init__(
        self,
        pool: KeepAlivePool,
        key: _Key,
        connection: httpcore.HTTPConnection,
        stream: typing.Iterable[bytes],
    ) -> None:
        self._pool = pool
        self._key = key
        self._connection = connection
        self._stream = stream
        self._returned = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        if self._returned:
            return
        self._returned = True
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._pool._give_back(self._key, self._connection)


class CheckedTransport(httpx.HTTPTransport):
    """:class:`httpx.HTTPTransport` with :class:`KeepAlivePool` and :class:`CheckedBackend`
    under it."""

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
        self._pool = KeepAlivePool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_keepalive_connections=limits.max_keepalive_connections or 0,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedBackend(policy, resolver),
        )


__all__ = ["CheckedBackend", "CheckedTransport", "KeepAlivePool", "Refused"]
