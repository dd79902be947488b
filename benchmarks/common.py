"""Orchestrator-side helpers shared by the benchmarks: publishing starts, reading rows."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from kombu import Connection

from benchmarks.harness import plain_conninfo, wait_for
from orchestrator.config import load_settings
from orchestrator.producer import Producer
from orchestrator.store.admission import ClaimRequest

AVATAR = "bench-avatar"


def make_producer(database_url: str, broker_url: str, **overrides: Any) -> Producer:
    """The real Python producer API (validation, publisher confirms, traceparent header)."""
    return Producer(load_settings(database_url=database_url, broker_url=broker_url, **overrides))


def claim_request(rid: str, **wish: Any) -> ClaimRequest:
    """A minimal request for ``store.claim`` in process (no vendor); ``wish`` is its
    account, labels or tenant."""
    return ClaimRequest(
        request_id=rid,
        claim_id=f"c-{rid}",
        payload={"avatar_id": "bench"},
        digest=rid,
        avatar_id="bench",
        metadata=None,
        max_duration_seconds=3600,
        start_deadline_seconds=None,
        traceparent=None,
        **wish,
    )


def start_kwargs(tag: str, i: int, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": f"{tag}-{i:07d}-{uuid.uuid4().hex[:6]}",
        "avatar_id": AVATAR,
        "max_session_duration": 30,
        **extra,
    }


def publish_starts(
    producer: Producer, tag: str, count: int, **extra: Any
) -> tuple[list[str], float]:
    """Publish ``count`` start jobs back to back; returns their ids and the publish rate."""
    ids: list[str] = []
    began = time.perf_counter()
    for i in range(count):
        ids.append(producer.enqueue_start_session(**start_kwargs(tag, i, **extra)))
    elapsed = time.perf_counter() - began
    return ids, count / elapsed if elapsed > 0 else float("nan")


def status_counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(plain_conninfo(database_url)) as conn:
        rows = conn.execute("SELECT status, count(*) FROM sessions GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


def wait_settled(
    database_url: str,
    count: int,
    timeout: float,
    *,
    settled: tuple[str, ...] = ("active", "failed", "ended"),
    alive: Callable[[], bool] | None = None,
) -> dict[str, int]:
    """Wait until ``count`` rows reached one of ``settled``; fail fast if the worker died."""

    def done() -> dict[str, int] | None:
        if alive is not None and not alive():
            raise RuntimeError("worker process exited during the benchmark")
        counts = status_counts(database_url)
        return counts if sum(counts.get(s, 0) for s in settled) >= count else None

    result: dict[str, int] = wait_for(done, timeout, f"{count} sessions settled", interval=0.25)
    return result


@dataclass(frozen=True)
class RowTimes:
    request_id: str
    status: str
    created_at: datetime | None
    start_sent_at: datetime | None
    started_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None


def row_times(database_url: str) -> list[RowTimes]:
    with psycopg.connect(plain_conninfo(database_url)) as conn:
        rows = conn.execute(
            "SELECT request_id, status, created_at, start_sent_at, started_at, expires_at,"
            " ended_at FROM sessions"
        ).fetchall()
    return [RowTimes(*r) for r in rows]


def truncate(database_url: str) -> None:
    with psycopg.connect(plain_conninfo(database_url), autocommit=True) as conn:
        conn.execute("TRUNCATE sessions, session_events, event_outbox RESTART IDENTITY CASCADE")
        # The vendor's last reported limit (migration 0006) outlives the rows that reported it.
        conn.execute("UPDATE vendor_accounts SET reported_limit = NULL, reported_at = NULL")


def purge(broker_url: str, *queues: str) -> None:
    with Connection(broker_url) as conn:
        channel: Any = conn.channel()
        for queue in queues:
            try:
                channel.queue_purge(queue)
            except Exception:  # the queue may not exist yet: a new channel for the next one
                channel = conn.channel()


def declare_orchestrator_topology(broker_url: str, queue_type: str = "quorum") -> None:
    from orchestrator.messaging import Topology

    with Connection(broker_url) as conn:
        Topology("classic" if queue_type == "classic" else "quorum").declare(conn)


def queue_depth(broker_url: str, queue: str) -> int:
    with Connection(broker_url) as conn:
        channel: Any = conn.channel()
        _, count, _ = channel.queue_declare(queue, passive=True)
        return int(count)


class Feeder:
    """Keeps a queue's ready depth at ``keep`` or more from a thread, so a worker measured over a
    time window never runs dry, without pre-filling thousands of messages."""

    def __init__(
        self, broker_url: str, queue: str, publish: Callable[[int], None], keep: int
    ) -> None:
        self._conn = Connection(broker_url)
        self._queue = queue
        self._publish = publish
        self._keep = keep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="feeder", daemon=True)
        self.published = 0
        self.error: BaseException | None = None

    def depth(self) -> int:
        channel: Any = self._conn.default_channel
        _, count, _ = channel.queue_declare(self._queue, passive=True)
        return int(count)

    def fill(self) -> None:
        missing = self._keep - self.depth()
        if missing > 0:
            self._publish(missing)
            self.published += missing

    def start(self) -> Feeder:
        self.fill()
        self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            while not self._stop.wait(0.2):
                self.fill()
        except BaseException as error:  # reported by stop()
            self.error = error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self._conn.release()
        if self.error is not None:
            raise RuntimeError(f"feeder failed: {self.error!r}")


def start_publisher(producer: Producer, tag: str, **extra: Any) -> Callable[[int], None]:
    """A ``publish(n)`` for :class:`Feeder` that numbers requests across calls."""
    counter = iter(range(10**9))

    def publish(n: int) -> None:
        for _ in range(n):
            producer.enqueue_start_session(**start_kwargs(tag, next(counter), **extra))

    return publish


class PgWaitSampler:
    """Samples ``pg_stat_activity`` of one database every 50 ms: what its busy backends are
    doing (a wait event such as ``Lock:advisory`` or ``IO:WALSync``, ``CPU`` when running) and
    how many sit ``idle in transaction`` (waiting for the worker, e.g. its GIL or the network)."""

    QUERY = """
        SELECT CASE WHEN state = 'active' THEN coalesce(wait_event_type || ':' || wait_event,
                                                        'CPU (running)')
                    ELSE 'idle in transaction (waiting for the client)' END, count(*)
        FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND state IN ('active', 'idle in transaction')
        GROUP BY 1
    """

    def __init__(self, database_url: str) -> None:
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self._conn = psycopg.connect(plain_conninfo(database_url), autocommit=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pg-waits", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            rows = self._conn.execute(self.QUERY).fetchall()
            self.samples += 1
            for what, n in rows:
                self.counts[str(what)] += int(n)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Mean number of backends in each state per sample (top 8)."""
        n = max(1, self.samples)
        return {
            "samples": self.samples,
            "mean_backends": {k: round(v / n, 2) for k, v in self.counts.most_common(8)},
        }
