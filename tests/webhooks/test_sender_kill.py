"""The sender SIGKILLed during a burst (2,000 events: 200 sessions of 10, the issue's 10,000
scaled down for CI): every event is delivered, duplicates share their ``webhook-id`` and body,
and each session's events arrive in order. And SIGKILLed between a receiver's answer and its
record: the delivery goes again, same ``webhook-id``. The sender needs no broker, so a broker
restart is no fault of its own (it is not tested here: this machine's RabbitMQ is shared)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from standardwebhooks.webhooks import Webhook

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.webhooks import endpoints
from orchestrator.webhooks.secrets import SecretBox
from orchestrator.webhooks.sender import Sender, policy_for
from orchestrator.webhooks.settings import WebhookSettings
from tests.conftest import settings_env
from tests.webhooks.receiver import Received, receiving
from tests.webhooks.support import KEY, drain, emit_events

pytestmark = [pytest.mark.postgres, pytest.mark.faults]
# 2,000 events in CI; WEBHOOK_BURST_SESSIONS=1000 gives the 10,000 of the issue (run by hand).
SESSIONS = int(os.environ.get("WEBHOOK_BURST_SESSIONS", "200"))
SCALE = max(1.0, SESSIONS / 200)  # the waits below grow with the burst
PER_SESSION = 10
STATUSES = ["active", "ended", "failed"]


def start_sender(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).parent / "orchestrator"), "webhooks", "send"]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def sender_env(settings_for: Callable[..., Settings]) -> dict[str, str]:
    env = settings_env(settings_for())
    env.update(
        ORCHESTRATOR_WEBHOOK_SECRET_KEY=KEY,
        ORCHESTRATOR_WEBHOOK_ALLOW="127.0.0.0/8",
        ORCHESTRATOR_WEBHOOK_TIMEOUT_SECONDS="1",
        ORCHESTRATOR_WEBHOOK_POLL_INTERVAL_SECONDS="0.05",
        ORCHESTRATOR_LOG_FORMAT="text",
    )
    return env


def test_sigkill_after_an_answer_before_its_record_sends_it_again(
    settings_for: Callable[..., Settings],
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
    tmp_path: Path,
) -> None:
    """The receiver answered 204; the sender's record of it is held (a row lock on the
    delivery, taken once the request is out) and the sender is killed there, its record
    never run. The delivery is
    still pending under the dead sender's lease; once that runs out another sender sends it
    again: same ``webhook-id``, same body, signatures valid (at least once)."""
    log = tmp_path / "sender.log"
    locker = wdb.engine.connect()
    held = threading.Event()

    def answer(_got: Received) -> tuple[int, dict[str, str], float]:
        if not held.is_set():  # the claim committed before the request went out
            locker.execute(text("SELECT 1 FROM webhook_deliveries FOR UPDATE"))
            held.set()
        return 204, {}, 0.0

    with receiving(answer) as receiver:
        added = endpoints.add(wdb, box, policy_for(webhook_settings()), receiver.url)
        emit_events(wdb, "kill-r", ["ended"])
        sender = start_sender(sender_env(settings_for), log)
        try:
            assert held.wait(30), log.read_text()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the record is waiting for the row lock
                with wdb.transaction() as session:
                    waiting = session.execute(
                        text(
                            "SELECT pid FROM pg_stat_activity"
                            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                            " AND query LIKE '%INSERT INTO webhook_attempts%'"
                        )
                    ).scalar()
                if waiting:
                    break
                time.sleep(0.05)
            assert waiting, log.read_text()
        finally:
            os.kill(sender.pid, signal.SIGKILL)
            sender.wait(10)
        # A sender killed before its record reached the server: its statement must not run
        # either (a backend waiting for a lock notices its client gone only after the wait).
        with wdb.transaction() as session:
            ended = session.execute(
                text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": waiting}
            )
            assert ended.scalar()  # waited for: the backend is gone
        locker.rollback()
        locker.close()
        with wdb.transaction() as session:
            row = session.execute(
                text("SELECT status, attempts, lease_until IS NOT NULL FROM webhook_deliveries")
            ).one()
            assert tuple(row) == ("pending", 0, True)
            session.execute(text("UPDATE webhook_deliveries SET lease_until = now()"))
        drain(make_sender(webhook_settings()), lambda: len(receiver.requests()) == 2)
        first, again = receiver.requests()
    assert again.webhook_id == first.webhook_id
    assert again.body == first.body
    for got in (first, again):
        Webhook(added.secret).verify(got.body, got.headers)
    with wdb.transaction() as session:
        assert session.execute(text("SELECT status FROM webhook_deliveries")).scalar() == (
            "delivered"
        )


def test_sigkill_during_a_burst_loses_nothing_and_keeps_order(
    settings_for: Callable[..., Settings],
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    tmp_path: Path,
) -> None:
    env = sender_env(settings_for)
    log = tmp_path / "sender.log"
    total = SESSIONS * PER_SESSION
    # Each request is verified when it arrives: the specification's verifier refuses a
    # timestamp more than 5 minutes old, and a large burst outlasts that.
    secret: list[str] = []
    unverified: list[str] = []

    def answer(got: Received) -> tuple[int, dict[str, str], float]:
        try:
            Webhook(secret[0]).verify(got.body, got.headers)
        except Exception as error:
            unverified.append(f"{got.webhook_id}: {error}")
        return 204, {}, 0.02

    with receiving(answer) as receiver:
        added = endpoints.add(wdb, box, policy_for(webhook_settings()), receiver.url)
        secret.append(added.secret)

        def burst() -> None:
            for step in range(PER_SESSION):
                for n in range(SESSIONS):
                    emit_events(wdb, f"kill-{n}", [STATUSES[step % 3]])

        producer = threading.Thread(target=burst)
        sender = start_sender(env, log)
        producer.start()
        try:
            deadline = time.monotonic() + 60 * SCALE
            while len(receiver.requests()) < total // 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(sender.pid, signal.SIGKILL)
            sender.wait(10)
            killed_at = len(receiver.requests())
            assert 0 < killed_at < total, log.read_text()
            sender = start_sender(env, log)
            producer.join(60 * SCALE)
            deadline = time.monotonic() + 120 * SCALE
            while time.monotonic() < deadline:
                if len({r.webhook_id for r in receiver.requests()}) >= total:
                    break
                time.sleep(0.1)
        finally:
            sender.send_signal(signal.SIGTERM)
            sender.wait(30)
        got = receiver.requests()

    with wdb.transaction() as session:
        outbox = session.execute(
            text("SELECT event_id::text, body->>'request_id' FROM event_outbox ORDER BY id")
        ).all()
    assert len(outbox) == total
    ids = {r.webhook_id for r in got}
    assert ids == {event_id for event_id, _ in outbox}, log.read_text()[-3000:]
    bodies: dict[str, bytes] = {}
    assert not unverified, unverified[:5]
    for r in got:
        data = r.document["data"]
        assert data["event_id"] == r.webhook_id
        assert bodies.setdefault(r.webhook_id, r.body) == r.body  # a duplicate is the same
    expected: dict[str, list[str]] = defaultdict(list)
    for event_id, request_id in outbox:
        expected[request_id].append(event_id)
    first_arrivals: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for r in got:
        if r.webhook_id not in seen:
            seen.add(r.webhook_id)
            first_arrivals[r.document["data"]["request_id"]].append(r.webhook_id)
    assert first_arrivals == expected  # each session's events in order
    print(
        f"sent {total}, received {len(got)} (duplicates {len(got) - total}), killed at {killed_at}"
    )
