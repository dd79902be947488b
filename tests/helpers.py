"""Small readers over the real database for assertions."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text

from orchestrator import store
from orchestrator.db import Database, OutboxEvent, SessionEvent, SessionRow
from orchestrator.store.admission import ADMISSION_LOCK_WAIT_SECONDS
from orchestrator.store.ending import end
from orchestrator.store.rows import S


def row(db: Database, request_id: str) -> SessionRow:
    with db.transaction() as session:
        found = session.scalars(select(SessionRow).where(SessionRow.request_id == request_id)).one()
        session.expunge(found)
        return found


def row_or_none(db: Database, request_id: str) -> SessionRow | None:
    """The row, or None while no worker has claimed the request yet."""
    with db.transaction() as session:
        found = session.scalars(
            select(SessionRow).where(SessionRow.request_id == request_id)
        ).one_or_none()
        if found is not None:
            session.expunge(found)
        return found


def rows(db: Database) -> list[SessionRow]:
    with db.transaction() as session:
        found = list(session.scalars(select(SessionRow).order_by(SessionRow.created_at)).all())
        session.expunge_all()
        return found


def event_kinds(db: Database, request_id: str | None = None) -> list[str]:
    with db.transaction() as session:
        query = select(SessionEvent.kind).order_by(SessionEvent.id)
        if request_id is not None:
            query = query.join(SessionRow, SessionRow.id == SessionEvent.session_id).where(
                SessionRow.request_id == request_id
            )
        return list(session.scalars(query).all())


def events(db: Database, kind: str) -> list[dict[str, Any]]:
    with db.transaction() as session:
        found = session.scalars(select(SessionEvent).where(SessionEvent.kind == kind)).all()
        return [
            {"session_id": e.session_id, "vendor_session_id": e.vendor_session_id, **e.detail}
            for e in found
        ]


def outbox_bodies(db: Database, request_id: str) -> list[dict[str, Any]]:
    """The lifecycle events queued for ``request_id``, oldest first."""
    with db.transaction() as session:
        found = session.scalars(select(OutboxEvent.body).order_by(OutboxEvent.id)).all()
        return [body for body in found if body.get("request_id") == request_id]


def insert_live_row(db: Database, request_id: str, vendor_id: str, age: float = 600) -> None:
    """An `active` row started ``age`` seconds ago that holds ``vendor_id``."""
    started = datetime.now(UTC) - timedelta(seconds=age)
    with db.transaction() as session:
        session.add(
            SessionRow(
                request_id=request_id,
                status="active",
                avatar_id="a",
                request_payload={"avatar_id": "a"},
                payload_sha256="0" * 64,
                vendor_session_id=vendor_id,
                created_at=started,
                started_at=started,
                expires_at=started + timedelta(hours=1),
            )
        )


def claim_request(
    db: Database,
    request_id: str,
    *,
    lock_wait_seconds: float = ADMISSION_LOCK_WAIT_SECONDS,
    **wish: object,
) -> store.Claim:
    """``store.claim`` of a minimal request, no vendor involved; ``wish`` is the request's
    account, labels or tenant."""
    return store.claim(
        db,
        store.ClaimRequest(
            request_id=request_id,
            claim_id=f"t-{request_id}",
            payload={"avatar_id": "x"},
            digest="d",
            avatar_id="x",
            metadata=None,
            max_duration_seconds=None,
            start_deadline_seconds=None,
            traceparent=None,
            **wish,  # type: ignore[arg-type]
        ),
        lease_seconds=60,
        lock_wait_seconds=lock_wait_seconds,
    )


def live_counts(db: Database, column: str) -> dict[str, int]:
    """Live rows (starting, active, stopping) counted by ``column`` (account or tenant)."""
    assert column in ("account", "tenant")
    with db.transaction() as session:
        found = session.execute(
            text(
                f"SELECT {column}, count(*) FROM sessions"
                " WHERE status IN ('starting', 'active', 'stopping') GROUP BY 1"
            )
        ).all()
    return {str(key): int(n) for key, n in found}


def end_one_at_random(db: Database, rng: random.Random) -> None:
    """End one starting or waiting row, as any terminal path would."""
    with db.transaction() as session:
        ids = list(
            session.scalars(
                text(
                    "SELECT id FROM sessions WHERE status IN ('starting', 'waiting')"
                    " ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED"
                )
            )
        )
        if ids:
            end(
                session, ids, rng.choice([S.ENDED, S.FAILED]), from_statuses=[S.STARTING, S.WAITING]
            )


def only_accounts(db: Database, caps: dict[str, int]) -> None:
    """The accounts of ``caps`` (weight 1, no labels) in the catalog, and only they: the
    ``default`` account the migrations make stops admitting."""
    store.sync_catalog(db, [store.CatalogEntry(n, cap, 1.0, {}) for n, cap in caps.items()])
    with db.transaction() as session:
        session.execute(
            text("UPDATE vendor_accounts SET in_catalog = (name = ANY(:names))"),
            {"names": list(caps)},
        )


def insert_rows_of_an_older_schema(database: Database, statuses: list[str]) -> None:
    """One row per status (``old-0``, ``old-1``, …) with only the columns every migrated
    schema has: the rows a migration that adds counters must count."""
    with database.transaction() as session:
        for i, status in enumerate(statuses):
            session.execute(
                text(
                    "INSERT INTO sessions (id, request_id, status, request_payload,"
                    " payload_sha256, created_at, attempts, stop_attempts)"
                    " VALUES (:id, :r, :s, '{}', 'x', now(), 0, 0)"
                ),
                {"id": uuid.uuid4(), "r": f"old-{i}", "s": status},
            )
