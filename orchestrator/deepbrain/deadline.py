"""A total deadline for every HTTP request to the vendor.

httpx's timeouts bound each phase (connect, TLS, each write, each read) separately, so one
request may take several times its timeout and a vendor that trickles its reply may hold a
thread indefinitely. This network backend clamps every socket operation to the time left
before the deadline the calling thread set (``within``), and raises httpcore's timeout for the
phase once it has passed; httpx maps that to its own ``ConnectTimeout``/``ReadTimeout``/
``WriteTimeout`` as for any other timeout.

httpx does not take a network backend as an argument; :func:`install` sets it on the
transport's connection pool (httpcore's public ``network_backend`` parameter, reached through
httpx's private ``_pool``). tests/test_edge_cases.py fails if an upgrade of either breaks it.
"""

from __future__ import annotations

import ssl
import threading
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager

import httpcore
import httpx

_local = threading.local()


@contextmanager
def within(deadline: float) -> Iterator[None]:
    """Every socket operation of this thread finishes by ``deadline`` (``time.monotonic()``)."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = deadline if previous is None else min(previous, deadline)
    try:
        yield
    finally:
        _local.deadline = previous


def _clamp(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise expired("the request's deadline has passed")
    return remaining if timeout is None else min(timeout, remaining)


class _Stream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(
            self._stream.start_tls(
                ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout)
            )
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(
            self._inner.connect_tcp(
                host, port, _clamp(timeout, httpcore.ConnectTimeout), local_address, socket_options
            )
        )

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(
            self._inner.connect_unix_socket(
                path, _clamp(timeout, httpcore.ConnectTimeout), socket_options
            )
        )

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def install(transport: httpx.HTTPTransport) -> httpx.HTTPTransport:
    """Give ``transport``'s connections the deadline backend; returns the transport."""
    pool = transport._pool  # private: see the module docstring
    backend = getattr(pool, "_network_backend", None)
    if backend is None:
        raise RuntimeError("httpx/httpcore changed: cannot set the deadline network backend")
    pool._network_backend = DeadlineBackend(backend)
    return transport
