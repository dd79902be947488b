"""Delivery from the outbox on real Postgres to local receivers: every request verified by the
official ``standardwebhooks`` package; retries, Retry-After, 410, disabling, order per session,
isolation, replay, rotation."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from standardwebhooks.webhooks import Webhook

from orchestrator.db import Database
from orchestrator.webhooks import endpoints
from orchestrator.webhooks.secrets import SecretBox
from orchestrator.webhooks.sender import Sender, policy_for
from orchestrator.webhooks.settings import WebhookSettings
from tests.webhooks.receiver import Received, Receiver, receiving
from tests.webhooks.support import drain, emit_events

pytestmark = pytest.mark.postgres


def add(
    db: Database, box: SecretBox, settings: WebhookSettings, url: str, **kw: Any
) -> endpoints.Added:
    return endpoints.add(db, box, policy_for(settings), url, **kw)


def deliveries(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as session:
        rows = session.execute(
            text(
                "SELECT d.*, o.event_id, o.id AS oid, extract(epoch FROM d.next_attempt_at - now())"
                " AS due_in FROM webhook_deliveries d JOIN event_outbox o ON o.id = d.outbox_id"
                " ORDER BY d.id"
            )
        ).mappings()
        return [dict(r) for r in rows]


def settled(db: Database) -> Callable[[], bool]:
    """Every event fanned out, and nothing due but what waits behind a session's earlier one."""

    def check() -> bool:
        with db.transaction() as session:
            unseen = session.execute(
                text("SELECT count(*) FROM event_outbox WHERE webhooks_fanned_at IS NULL")
            ).scalar()
            due = session.execute(
                text(
                    "SELECT count(*) FROM webhook_deliveries d WHERE d.status = 'pending'"
                    " AND d.next_attempt_at <= now() AND NOT EXISTS (SELECT FROM"
                    " webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id AND"
                    " p.order_key = d.order_key AND p.status = 'pending'"
                    " AND p.outbox_id < d.outbox_id)"
                )
            ).scalar()
        return unseen == 0 and due == 0

    return check


def make_due(db: Database) -> None:
    with db.transaction() as session:
        session.execute(
            text("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE status = 'pending'")
        )


def verify_all(receiver: Receiver, *secrets: str) -> list[dict[str, Any]]:
    return [Webhook(s).verify(r.body, r.headers) for r in receiver.requests() for s in secrets]


def test_every_event_is_delivered_signed_once_per_endpoint(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    settings = webhook_settings()
    with receiving() as receiver, receiving() as only_ended:
        added = add(wdb, box, settings, receiver.url)
        ended = add(wdb, box, settings, only_ended.url, event_types=["session.ended"])
        for n in range(3):
            emit_events(wdb, f"req-{n}", ["active", "ended"])
        emit_events(wdb, "req-x", ["failed"])
        drain(make_sender(settings), settled(wdb))
        documents = verify_all(receiver, added.secret)
        assert len(documents) == 7
        assert {d["type"] for d in documents} == {
            "session.active",
            "session.ended",
            "session.failed",
        }
        active = next(d for d in documents if d["type"] == "session.active")
        assert active["data"]["token"] is None  # plain HTTP: no LiveKit token
        assert [d["type"] for d in verify_all(only_ended, ended.secret)] == ["session.ended"] * 3
        with wdb.transaction() as session:
            outbox = dict(
                session.execute(text("SELECT event_id::text, body FROM event_outbox")).all()
            )
        for got in receiver.requests():
            assert got.webhook_id in outbox  # the webhook-id is the event's event_id
            assert got.document["data"]["event_id"] == got.webhook_id
        assert {d["status"] for d in deliveries(wdb)} == {"delivered"}


def test_a_failure_is_retried_on_the_schedule_and_honours_retry_after(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    answers = iter([(503, {"retry-after": "120"}, 0.0), (500, {}, 0.0)])

    def answer(_r: Received) -> tuple[int, dict[str, str], float]:
        return next(answers, (200, {}, 0.0))

    settings = webhook_settings()
    with receiving(answer) as receiver:
        added = add(wdb, box, settings, receiver.url)
        emit_events(wdb, "req-r", ["ended"])
        sender = make_sender(settings)
        drain(sender, settled(wdb))
        first = deliveries(wdb)[0]
        assert (first["status"], first["attempts"]) == ("pending", 1)
        assert 119 <= first["due_in"] <= 121  # Retry-After beats the 5 s step
        make_due(wdb)
        drain(sender, settled(wdb))
        second = deliveries(wdb)[0]
        assert second["attempts"] == 2 and 5 * 0.8 - 0.5 <= second["due_in"] <= 300 * 1.2
        assert second["due_in"] >= 300 * 0.8 - 1  # the third step: 5 min, jittered
        make_due(wdb)
        drain(sender, settled(wdb))
        assert deliveries(wdb)[0]["status"] == "delivered"
        ids = {r.webhook_id for r in receiver.requests()}
        assert len(receiver.requests()) == 3 and len(ids) == 1  # one webhook-id for all
        verify_all(receiver, added.secret)
    with wdb.transaction() as session:
        codes = (
            session.execute(text("SELECT status_code FROM webhook_attempts ORDER BY id"))
            .scalars()
            .all()
        )
    assert codes == [503, 500, 200]


def test_410_disables_the_endpoint_with_an_event(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    settings = webhook_settings()
    with receiving(lambda _r: (410, {}, 0.0)) as gone, receiving() as watcher:
        dead = add(wdb, box, settings, gone.url)
        add(wdb, box, settings, watcher.url, event_types=["endpoint.disabled"])
        emit_events(wdb, "req-g", ["active", "ended"])
        drain(make_sender(settings), settled(wdb))
        assert len(gone.requests()) == 1  # the later event waited, then was given up
        rows = [d for d in deliveries(wdb) if d["endpoint_id"] == dead.endpoint_id]
        assert [d["status"] for d in rows] == ["given_up", "given_up"]
        [notice] = [r.document for r in watcher.requests()]
        assert notice["type"] == "endpoint.disabled"
        assert notice["data"]["endpoint_id"] == str(dead.endpoint_id)
        assert notice["data"]["reason"] == "gone"
        row = next(r for r in endpoints.listing(wdb) if r["id"] == dead.endpoint_id)
        assert (row["enabled"], row["disabled_reason"]) == (False, "gone")


def test_an_endpoint_failing_for_the_set_time_is_disabled(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    settings = webhook_settings(disable_after_seconds=3600)
    with receiving(lambda _r: (500, {}, 0.0)) as failing:
        added = add(wdb, box, settings, failing.url)
        emit_events(wdb, "req-f", ["ended"])
        sender = make_sender(settings)
        drain(sender, settled(wdb))
        assert endpoints.listing(wdb)[0]["enabled"] is True  # failing, not for long yet
        with wdb.transaction() as session:
            session.execute(
                text(
                    "UPDATE webhook_endpoints SET failing_since = now() - interval"
                    " '61 minutes' WHERE id = :e"
                ),
                {"e": added.endpoint_id},
            )
        make_due(wdb)
        drain(sender, settled(wdb))
        row = endpoints.listing(wdb)[0]
        assert (row["enabled"], row["disabled_reason"]) == (False, "failing")
        with wdb.transaction() as session:
            kinds = (
                session.execute(text("SELECT routing_key FROM event_outbox ORDER BY id"))
                .scalars()
                .all()
            )
        assert kinds == ["session.ended", "endpoint.disabled"]


def test_a_success_records_its_attempt_and_clears_the_failing_clock(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    """A success after a failure: both attempts recorded, the delivery delivered, and the
    endpoint no longer failing (else it would be disabled later for an old failure)."""
    answers = iter([(500, {}, 0.0), (204, {}, 0.0)])
    settings = webhook_settings()
    with receiving(lambda _r: next(answers)) as receiver:
        add(wdb, box, settings, receiver.url)
        emit_events(wdb, "req-s", ["ended"])
        sender = make_sender(settings)
        drain(sender, settled(wdb))
        make_due(wdb)
        drain(sender, lambda: deliveries(wdb)[0]["status"] == "delivered")
    with wdb.transaction() as session:
        codes = (
            session.execute(text("SELECT status_code FROM webhook_attempts ORDER BY id"))
            .scalars()
            .all()
        )
        failing = session.execute(text("SELECT failing_since FROM webhook_endpoints")).scalar()
    assert list(codes) == [500, 204]
    assert deliveries(wdb)[0]["attempts"] == 2
    assert failing is None


def wait_for_requests(receiver: Receiver, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.requests()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(receiver.requests()) == count


def test_a_stopped_sender_records_the_successes_it_gathered(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    """SIGTERM (``close``): the attempts under way finish and their successes are recorded
    before the sender exits, so nothing it sent is sent again."""
    settings = webhook_settings()
    with receiving() as receiver:
        add(wdb, box, settings, receiver.url)
        for n in range(3):
            emit_events(wdb, f"req-t{n}", ["ended"])
        sender = make_sender(settings)
        assert sender.pass_once() == 3
        wait_for_requests(receiver, 3)
        sender.close()
        assert [(d["status"], d["attempts"]) for d in deliveries(wdb)] == [("delivered", 1)] * 3
        assert make_sender(settings).pass_once() == 0
        assert len(receiver.requests()) == 3


def test_a_session_s_events_arrive_in_order_and_a_given_up_one_lets_the_next_go(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    first_seen: set[str] = set()

    def answer(got: Received) -> tuple[int, dict[str, str], float]:
        if (
            got.document["data"]["request_id"] == "req-a"
            and got.document["type"] == "session.active"
        ):
            return 500, {}, 0.0  # A's first event always fails
        first_seen.add(got.webhook_id)
        return 204, {}, 0.0

    settings = webhook_settings()
    with receiving(answer) as receiver:
        add(wdb, box, settings, receiver.url)
        emit_events(wdb, "req-a", ["active", "ended"])
        emit_events(wdb, "req-b", ["active", "ended"])
        sender = make_sender(settings)
        drain(sender, settled(wdb))
        sent = [(r.document["data"]["request_id"], r.document["type"]) for r in receiver.requests()]
        assert ("req-a", "session.ended") not in sent  # waits behind A's failing first event
        assert ("req-b", "session.ended") in sent  # another session is not held up
        with wdb.transaction() as session:  # A's first event on its last attempt
            session.execute(
                text(
                    "UPDATE webhook_deliveries SET attempts = 9, next_attempt_at ="
                    " now() WHERE status = 'pending'"
                )
            )
        drain(sender, settled(wdb))
        sent = [(r.document["data"]["request_id"], r.document["type"]) for r in receiver.requests()]
        assert sent[-1] == ("req-a", "session.ended")
        statuses = {(d["order_key"], d["event_type"]): d["status"] for d in deliveries(wdb)}
        assert statuses[("req-a", "session.active")] == "given_up"
        assert statuses[("req-a", "session.ended")] == "delivered"


def test_a_slow_endpoint_delays_no_other(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    at_once = {"now": 0, "max": 0}
    lock = threading.Lock()

    def slow(_r: Received) -> tuple[int, dict[str, str], float]:
        with lock:
            at_once["now"] += 1
            at_once["max"] = max(at_once["max"], at_once["now"])
        time.sleep(1.5)
        with lock:
            at_once["now"] -= 1
        return 204, {}, 0.0

    settings = webhook_settings(timeout_seconds=5.0, concurrency=8, per_endpoint_concurrency=2)
    with receiving(slow) as slow_receiver, receiving() as healthy:
        add(wdb, box, settings, slow_receiver.url)
        add(wdb, box, settings, healthy.url)
        started = time.time()
        for n in range(10):
            emit_events(wdb, f"req-s{n}", ["ended"])
        sender = make_sender(settings)
        deadline = time.monotonic() + 5
        while len(healthy.requests()) < 10 and time.monotonic() < deadline:
            sender.pass_once()
            time.sleep(0.02)
        assert len(healthy.requests()) == 10
        assert max(r.at for r in healthy.requests()) - started < 1.5
        assert len(slow_receiver.requests()) <= 4  # two at a time, 1.5 s each
        drain(sender, settled(wdb), timeout=30)
        assert at_once["max"] == 2


def test_redirects_are_not_followed(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    settings = webhook_settings()
    with receiving(lambda _r: (307, {"location": "http://169.254.169.254/latest"}, 0.0)) as r:
        add(wdb, box, settings, r.url)
        emit_events(wdb, "req-red", ["ended"])
        drain(make_sender(settings), settled(wdb))
        assert len(r.requests()) == 1
    with wdb.transaction() as session:
        assert session.execute(text("SELECT status_code, error FROM webhook_attempts")).one() == (
            307,
            "HTTP 307",
        )


def test_replay_and_rotation(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
    make_sender: Callable[..., Sender],
) -> None:
    settings = webhook_settings()
    with receiving() as receiver:
        added = add(wdb, box, settings, receiver.url)
        emit_events(wdb, "req-p", ["active", "ended"])
        sender = make_sender(settings)
        drain(sender, settled(wdb))
        new = endpoints.rotate(wdb, box, added.endpoint_id, grace_seconds=3600)
        first = receiver.requests()[0].webhook_id
        assert endpoints.replay(wdb, event_id=uuid.UUID(first)) == 1
        drain(sender, settled(wdb))
        replayed = receiver.requests()[-1]
        assert replayed.webhook_id == first  # the same webhook-id as the first time
        assert len(replayed.headers["webhook-signature"].split(" ")) == 2
        Webhook(added.secret).verify(replayed.body, replayed.headers)
        Webhook(new).verify(replayed.body, replayed.headers)
        with wdb.transaction() as session:
            since = session.execute(text("SELECT min(created_at) FROM event_outbox")).scalar()
        assert endpoints.replay(wdb, since=since) == 2
        drain(sender, settled(wdb))
        assert len(receiver.requests()) == 5
        with wdb.transaction() as session:  # the old secret stops signing after the grace
            session.execute(
                text("UPDATE webhook_secrets SET expires_at = now() WHERE expires_at IS NOT NULL")
            )
        assert endpoints.replay(wdb, event_id=uuid.UUID(first)) == 1
        drain(sender, settled(wdb))
        last = receiver.requests()[-1]
        assert len(last.headers["webhook-signature"].split(" ")) == 1
        Webhook(new).verify(last.body, last.headers)


def test_secrets_are_never_stored_or_shown_in_plain_text(
    wdb: Database,
    box: SecretBox,
    webhook_settings: Callable[..., WebhookSettings],
) -> None:
    settings = webhook_settings()
    added = add(wdb, box, settings, "https://hooks.example.com/in")
    raw = added.secret.removeprefix("whsec_")
    with wdb.transaction() as session:
        dumped = str(session.execute(text("SELECT * FROM webhook_secrets")).all())
        dumped += str(session.execute(text("SELECT * FROM webhook_endpoints")).all())
    dumped += str(endpoints.listing(wdb))
    assert raw not in dumped and added.secret not in dumped
