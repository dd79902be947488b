"""The bare Celery baselines of P1 and P2: one app with the orchestrator's worker settings
(JSON only, late acks, reject on worker lost, prefetch multiplier 1, a durable queue with the
same dead-letter argument, publisher confirms, no gossip/mingle/events; pool and concurrency
given on the command line) and three tasks:

- ``bench.noop``: nothing (P1): the cost of Celery and the broker alone;
- ``bench.io``: the start's I/O by hand (P1): insert the row, call the vendor, update the row,
  publish the event; none of the orchestrator's guarantees (no admission, no idempotency, no
  outbox, no retries, no validation, no tracing);
- ``bench.sleep``: wait like a vendor call would (P2): the pool's concurrency ceiling.

Completion times are kept by a ``task_postrun`` handler and written to ``BENCH_DONE_FILE``
once ``BENCH_EXPECTED`` tasks have run; the ready file gets the time the worker was ready.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from celery import Celery, signals
from kombu import Exchange, Queue

QUEUE = Queue(
    "bench.bare",
    Exchange("bench.bare", type="direct", durable=True),
    routing_key="bench.bare",
    durable=True,
    queue_arguments={"x-dead-letter-exchange": "bench.dlx"},
)


def make_app(broker_url: str) -> Celery:
    """The baseline app; the benchmark process uses it to publish, the worker to consume."""
    celery = Celery("bench_bare", broker=broker_url, set_as_current=False)
    celery.conf.update(CONFIG)
    return celery


CONFIG: dict[str, Any] = {
    "task_serializer": "json",
    "accept_content": ["json"],
    "task_ignore_result": True,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_queues": (QUEUE,),
    "task_default_queue": "bench.bare",
    "task_create_missing_queues": False,
    "broker_transport_options": {"confirm_publish": True},
    "worker_hijack_root_logger": False,
    "worker_send_task_events": False,
}
app = make_app(os.environ.get("BENCH_BROKER_URL", "memory://"))


@app.task(name="bench.noop", acks_late=True, reject_on_worker_lost=True)
def noop(**_: Any) -> None:
    """Does nothing: the baseline is the cost of Celery and the broker alone."""


# -- bench.io: the start's I/O by hand ------------------------------------------------------

EVENTS = Exchange("bench.events", type="topic", durable=True)
_local = threading.local()
_token_lock = threading.Lock()
_token: list[str] = []

# The same columns the orchestrator writes; like its claim, the insert's commit does not wait
# for the WAL flush (set_config(..., true) lasts for this statement's transaction alone).
INSERT_ROW = """
WITH async AS (SELECT set_config('synchronous_commit', 'off', true))
INSERT INTO sessions (id, request_id, claim_id, status, avatar_id, request_payload,
                      payload_sha256, created_at, start_sent_at, attempts)
SELECT %(id)s, %(request_id)s, %(claim_id)s, 'starting', %(avatar_id)s, %(payload)s::jsonb,
       %(digest)s, %(now)s, %(now)s, 1
FROM async
"""
UPDATE_ROW = """
UPDATE sessions SET status = 'active', vendor_session_id = %(vendor_session_id)s,
       voice_id = %(voice_id)s, livekit_url = %(livekit_url)s, livekit_room = %(livekit_room)s,
       livekit_token = %(livekit_token)s, started_at = %(now)s, expires_at = %(expires_at)s
WHERE id = %(id)s AND status = 'starting'
"""


def _database() -> psycopg.Connection[Any]:
    """This thread's connection (autocommit: one statement, one transaction)."""
    conn: psycopg.Connection[Any] | None = getattr(_local, "database", None)
    if conn is None:
        conn = psycopg.connect(os.environ["BENCH_DATABASE_URL"], autocommit=True)
        _local.database = conn
    return conn


_vendor_client: list[httpx.Client] = []


def _vendor() -> httpx.Client:
    """One HTTP client shared by the threads (httpx's pool is thread-safe), made once: a
    client per thread would pay for an SSL context each."""
    with _token_lock:
        if not _vendor_client:
            _vendor_client.append(
                httpx.Client(
                    base_url=os.environ["BENCH_VENDOR_URL"],
                    timeout=30,
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
                )
            )
        return _vendor_client[0]


def _vendor_token() -> str:
    """One session token for the process (the orchestrator caches it too)."""
    if _token:
        return _token[0]
    vendor = _vendor()
    with _token_lock:
        if not _token:
            reply = vendor.post(
                "/api/v2/sessions/token",
                json={"appId": os.environ["BENCH_APP_ID"], "userKey": os.environ["BENCH_USER_KEY"]},
            )
            reply.raise_for_status()
            _token.append(reply.json()["data"]["session_token"])
        return _token[0]


@app.task(name="bench.io", bind=True, acks_late=True, reject_on_worker_lost=True)
def io(
    self: Any, /, request_id: str, avatar_id: str, max_session_duration: int = 30, **_: Any
) -> None:
    """Insert the row, start at the vendor, mark the row active, publish ``session.active``."""
    body = {"avatar_id": avatar_id, "max_session_duration": max_session_duration}
    payload = json.dumps(body)
    row_id = uuid.uuid4()
    database = _database()
    database.execute(
        INSERT_ROW,
        {
            "id": row_id,
            "request_id": request_id,
            "claim_id": self.request.id,
            "avatar_id": avatar_id,
            "payload": payload,
            "digest": hashlib.sha256(payload.encode()).hexdigest(),
            "now": datetime.now(UTC),
        },
    )
    reply = _vendor().post(
        "/api/v2/sessions/start",
        json=body,
        headers={"Authorization": f"Bearer {_vendor_token()}"},
    )
    reply.raise_for_status()
    data = reply.json()["data"]
    now = datetime.now(UTC)
    livekit = data["livekit"]
    database.execute(
        UPDATE_ROW,
        {
            "id": row_id,
            "vendor_session_id": data["session_id"],
            "voice_id": data.get("voice_id"),
            "livekit_url": livekit["url"],
            "livekit_room": livekit["room_name"],
            "livekit_token": livekit["token"],
            "now": now,
            "expires_at": now + timedelta(minutes=max_session_duration),
        },
    )
    event = {
        "event_id": str(uuid.uuid4()),
        "status": "active",
        "request_id": request_id,
        "vendor_session_id": data["session_id"],
        "occurred_at": now.isoformat(),
        "livekit_url": livekit["url"],
        "livekit_room": livekit["room_name"],
        "livekit_token": livekit["token"],
    }
    with app.producer_pool.acquire(block=True, timeout=10) as producer:
        producer.publish(
            event,
            exchange=EVENTS,
            routing_key="session.active",
            serializer="json",
            delivery_mode=2,
            declare=[EVENTS],
        )


@app.task(name="bench.sleep", acks_late=True, reject_on_worker_lost=True)
def sleep(seconds: float = 1.0, **_: Any) -> None:
    """Waits like a vendor call would, holding no lock: the pool's own concurrency ceiling."""
    time.sleep(seconds)


_done: list[float] = []
_lock = threading.Lock()


@signals.task_postrun.connect
def _record(**_: Any) -> None:
    now = time.time()
    with _lock:
        _done.append(now)
        finished = len(_done) == int(os.environ.get("BENCH_EXPECTED", "0"))
        times = list(_done) if finished else None
    if times is not None:
        _write(times)


def _write(times: list[float]) -> None:
    target = Path(os.environ["BENCH_DONE_FILE"])
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(times))
    tmp.rename(target)


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    """Stopped before ``BENCH_EXPECTED`` (a timed window): write what ran."""
    target = os.environ.get("BENCH_DONE_FILE")
    if target and not Path(target).exists():
        with _lock:
            _write(list(_done))


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    ready = os.environ.get("BENCH_READY_FILE")
    if ready:
        tmp = Path(ready).with_suffix(".tmp")
        tmp.write_text(repr(time.time()))
        tmp.rename(ready)
