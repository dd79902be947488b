"""A local HTTP receiver for webhook tests: records every request (headers, body, time) and
answers as its ``answer`` function says (status, headers, seconds to wait first)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, str], float]


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def document(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    def __init__(self, answer: Callable[[Received], Answer] | None = None) -> None:
        self.answer = answer or (lambda _r: (204, {}, 0.0))
        self.received: list[Received] = []
        self.truncated = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                if len(body) < length:  # the sender died mid-body: no request, as for any server
                    with receiver._lock:
                        receiver.truncated += 1
                    self.close_connection = True
                    return
                got = Received({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver._lock:
                    receiver.received.append(got)
                status, headers, wait = receiver.answer(got)
                if wait:
                    time.sleep(wait)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *_args: Any) -> None:
                pass

        return Handler

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)


@contextmanager
def receiving(answer: Callable[[Received], Answer] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(answer)
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
