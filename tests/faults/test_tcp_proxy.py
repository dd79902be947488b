"""The fault proxy itself: a stall holds bytes both ways without closing anything, and they
flow again in order; a cut resets a stalled connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.faults.tcp_proxy import TcpProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    running = threading.Event()
    running.set()

    def serve() -> None:
        while running.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    running.clear()
    thread.join(2)
    server.close()


def test_a_stall_holds_bytes_until_unstalled_and_a_cut_ends_it(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        client.sendall(b"one")
        assert client.recv(16) == b"one"
        proxy.stall()
        client.sendall(b"two")
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(16)
        proxy.unstall()
        client.settimeout(2)
        assert client.recv(16) == b"two"
        proxy.stall()
        client.sendall(b"three")
        assert proxy.cut() == 1
        try:
            held = client.recv(16)  # the stalled bytes never arrive: EOF or a reset
        except OSError:
            held = b""
        assert held == b""
        assert proxy.stalls == 2
        client.close()
