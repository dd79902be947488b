"""A small threaded TCP proxy for outage tests: forwards a local port to a target, and can
refuse new connections and cut the existing ones, stall every connection (they stay open, no
byte moves), or drop one reply, so a process behind it loses its server while the server
itself (shared with the rest of the suite) keeps running. One proxy serves Postgres, the
broker and the vendor alike.

    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
        proxy.cut()       # existing connections reset, new ones refused (nothing listens)
        proxy.restore()   # listen again on the same port
        proxy.drop_reply_to(b"UPDATE")  # that statement reaches the server; its reply never
                                        # reaches the client, whose connection is then reset
        proxy.stall()     # connections stay open, nothing moves either way (new ones too)
        proxy.unstall()   # bytes held back flow again, in order
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

ACCEPT_POLL_SECONDS = 0.1
CHUNK = 65536


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.accepted = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._drop_marker: bytes | None = None
        self._reset_after = 0.5
        self._blackholed: set[tuple[socket.socket, socket.socket]] = set()
        self.replies_dropped = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self.stalls = 0

    # -- control ----------------------------------------------------------------------

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self.port))
        listener.listen(128)
        listener.settimeout(ACCEPT_POLL_SECONDS)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._serving.set()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    @property
    def refusing(self) -> bool:
        return not self._serving.is_set()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> int:
        """Stop listening (new connections are refused) and reset every open connection.
        Returns how many connections were cut."""
        self._stop_listening()
        self.cuts += 1
        return self.drop_connections()

    def drop_connections(self) -> int:
        """Reset every open connection (the listener stays as it is)."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        return len(pairs)

    def drop_reply_to(self, marker: bytes, reset_after: float = 0.5) -> None:
        """Once: the next client chunk containing ``marker`` reaches the server, but nothing
        the server answers on that connection reaches the client, and the connection is reset
        ``reset_after`` seconds later (the server has executed, and committed, by then)."""
        with self._lock:
            self._drop_marker = marker
            self._reset_after = reset_after

    def stall(self) -> None:
        """Hold every byte, both ways, on open and new connections, until :meth:`unstall`:
        a server that stops answering without closing anything (a network partition, a
        process stopped with SIGSTOP)."""
        if self._flowing.is_set():
            self.stalls += 1
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def restore(self) -> None:
        """Listen again, on the same port."""
        if self._serving.is_set():
            return
        self.start()

    def close(self) -> None:
        self._flowing.set()
        self._stop_listening()
        self.drop_connections()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _stop_listening(self) -> None:
        self._serving.clear()
        thread, listener = self._accept_thread, self._listener
        if thread is not None:
            thread.join(5)
        if listener is not None:
            listener.close()
        self._accept_thread = self._listener = None

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._serving.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True).start()

    def _reset_pair(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            self._pairs.discard(pair)
        for sock in pair:
            _reset(sock)

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        from_client = source is pair[0]
        try:
            while data := source.recv(CHUNK):
                while not self._flowing.wait(ACCEPT_POLL_SECONDS):
                    if pair not in self._pairs:  # cut while stalled
                        raise OSError("connection cut")
                if not from_client and pair in self._blackholed:
                    continue  # the reply is lost on its way
                if from_client and self._drop_marker is not None and self._drop_marker in data:
                    with self._lock:
                        self._drop_marker = None
                        self._blackholed.add(pair)
                        self.replies_dropped += 1
                    timer = threading.Timer(self._reset_after, self._reset_pair, args=(pair,))
                    timer.daemon = True
                    timer.start()
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._pairs.discard(pair)
        # One side is done: end both (a half-open proxy would only confuse the client).
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0), like a server or a firewall dropping the connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
