"""``python -m benchmarks.clientload MODE CONCURRENCY SECONDS BASE_URL``: the vendor-call
ceiling without Celery or the database, printed as one JSON line.

MODE ``httpx-threads``: CONCURRENCY threads share one :class:`DeepBrainClient` (the worker's
own client, with whatever connection handling it has) and call ``start_session`` in a loop, as
the threads pool does.
MODE ``httpx-client-per-thread``: each thread has a :class:`DeepBrainClient` of its own, the
reference for a client without shared state.
MODE ``aiohttp``: CONCURRENCY asyncio tasks share one ``aiohttp.ClientSession`` and POST the
same start (token fetched once), the design an asyncio worker would use.
Completions are counted after a warm-up of a quarter of SECONDS (token fetches, connects).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

from benchmarks.harness import APP_ID, USER_KEY

BODY = {"avatar_id": "bench-avatar", "max_session_duration": 30}


def _httpx_threads(
    concurrency: int, seconds: float, base_url: str, *, shared: bool
) -> tuple[list[float], float]:
    from orchestrator.deepbrain import DeepBrainClient

    def new_client() -> DeepBrainClient:
        return DeepBrainClient(base_url, APP_ID, USER_KEY, timeout_seconds=30)

    one = new_client() if shared else None
    clients = [one or new_client() for _ in range(concurrency)]
    done: list[float] = []
    lock = threading.Lock()
    began = time.monotonic()
    stop_at = began + seconds

    def loop(client: DeepBrainClient) -> None:
        while time.monotonic() < stop_at:
            client.start_session(BODY)
            with lock:
                done.append(time.monotonic())

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    for client in set(clients):
        client.close()
    return done, began


async def _aiohttp(concurrency: int, seconds: float, base_url: str) -> tuple[list[float], float]:
    import aiohttp

    done: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector) as http:
        async with http.post(
            "/api/v2/sessions/token", json={"appId": APP_ID, "userKey": USER_KEY}
        ) as reply:
            token = (await reply.json())["data"]["session_token"]
        headers = {"Authorization": f"Bearer {token}"}
        began = time.monotonic()
        stop_at = began + seconds

        async def loop() -> None:
            while time.monotonic() < stop_at:
                async with http.post("/api/v2/sessions/start", json=BODY, headers=headers) as r:
                    data: dict[str, Any] = await r.json()
                    if data.get("code") != 1000:
                        raise RuntimeError(f"start failed: {data.get('message')}")
                done.append(time.monotonic())

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done, began


def main(argv: list[str]) -> int:
    mode, concurrency, seconds, base_url = argv[0], int(argv[1]), float(argv[2]), argv[3]
    cpu0 = time.process_time()
    if mode == "httpx-threads":
        done, began = _httpx_threads(concurrency, seconds, base_url, shared=True)
    elif mode == "httpx-client-per-thread":
        done, began = _httpx_threads(concurrency, seconds, base_url, shared=False)
    elif mode == "aiohttp":
        done, began = asyncio.run(_aiohttp(concurrency, seconds, base_url))
    else:
        raise SystemExit(f"unknown mode {mode}")
    warm = began + seconds / 4
    end = began + seconds
    counted = [t for t in done if warm <= t <= end]
    rate = len(counted) / (end - warm)
    cpu = time.process_time() - cpu0
    print(
        json.dumps(
            {
                "mode": mode,
                "concurrency": concurrency,
                "rate_per_s": round(rate, 1),
                "calls": len(done),
                "cpu_ms_per_call": round(cpu * 1000 / max(1, len(done)), 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
