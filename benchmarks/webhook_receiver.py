"""P6's healthy webhook endpoints: a small asyncio HTTP/1.1 keep-alive server in a process of
its own, standing in for the receivers' systems (their cost is not the sender's).

    python -m benchmarks.webhook_receiver --ports 2 --ready PATH

Listens on ``--ports`` loopback ports and writes them to ``PATH`` (JSON, once listening).
Each POST is read whole (headers, then ``content-length`` bytes of body); its ``webhook-id``,
its arrival time (``time.time()`` once the body is in) and its body are kept, and it is
answered ``204`` at once. Two GETs on the same port, for the runner, answer JSON:
``/_count`` (distinct ``webhook-id`` received on that port) and ``/_records`` (every request
kept: ``[webhook_id, arrival, the body's "timestamp"]``). A body cut short is not a request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

NO_CONTENT = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"

Record = tuple[str, float, bytes]


class Endpoint:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.ids: set[str] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1]
                length, webhook_id = 0, ""
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"webhook-id":
                        webhook_id = value.strip().decode()
                body = await reader.readexactly(length) if length else b""
                at = time.time()
                if target.startswith(b"/_"):
                    writer.write(self._control(target))
                    continue
                self.records.append((webhook_id, at, body))
                self.ids.add(webhook_id)
                writer.write(NO_CONTENT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def _control(self, target: bytes) -> bytes:
        if target == b"/_count":
            answer: object = len(self.ids)
        else:
            answer = [
                [webhook_id, at, json.loads(body)["timestamp"]]
                for webhook_id, at, body in self.records
            ]
        data = json.dumps(answer).encode()
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(data)}\r\n\r\n".encode()
            + data
        )


async def main(ports: int, ready: Path) -> None:
    servers = []
    for _ in range(ports):
        endpoint = Endpoint()
        servers.append(await asyncio.start_server(endpoint.serve, "127.0.0.1", 0, backlog=1024))
    listening = [s.sockets[0].getsockname()[1] for s in servers]
    partial = ready.with_suffix(".tmp")
    partial.write_text(json.dumps(listening))
    os.replace(partial, ready)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", type=int, default=2)
    parser.add_argument("--ready", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.ports, args.ready))
