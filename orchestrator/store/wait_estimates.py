"""Each waiting request's latest wait estimate (``wait_estimates``, migration 0011), and the
``session.waiting`` events that tell it: the first estimate always, a later one only when
:func:`orchestrator.tenants.should_resend` says it moved enough (at most once per 30 s per
request). One short transaction per pass; a request that stopped waiting since the pool was
read gets neither a row nor an event. No lock is taken on ``sessions`` (admission skips
locked rows; an estimate must never make it pass a request over)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from orchestrator.db import Database
from orchestrator.events.outbox import Update, emit
from orchestrator.store.wait_pool import PoolSnapshot
from orchestrator.tenants import SentQuote, WaitEstimate, should_resend

#: One pass at a time, across every worker (a transaction-level advisory lock; a second pass
#: that finds it taken skips its write: the first one's is as fresh).
ESTIMATE_LOCK_KEY = 0x7761697473  # "waits"

_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)")
_STILL_WAITING = text(
    "SELECT s.id, e.sent_at, e.sent_p50_at, e.sent_p90_at FROM sessions s"
    " LEFT JOIN wait_estimates e ON e.session_id = s.id"
    " WHERE s.id = ANY(:ids) AND s.status = 'waiting'"
)
_UPSERT = text(
    "INSERT INTO wait_estimates AS e (session_id, position, p50_seconds, p90_seconds,"
    " estimated_at, sent_at, sent_p50_at, sent_p90_at, sent_count)"
    " SELECT u.id, u.position, u.p50, u.p90, :now, u.sent_at, u.sent_p50_at, u.sent_p90_at,"
    "  CASE WHEN u.sent_at IS NULL THEN 0 ELSE 1 END"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:positions AS integer[]),"
    "  CAST(:p50s AS double precision[]), CAST(:p90s AS double precision[]),"
    "  CAST(:sent_ats AS timestamptz[]), CAST(:sent_p50_ats AS timestamptz[]),"
    "  CAST(:sent_p90_ats AS timestamptz[]))"
    "  AS u(id, position, p50, p90, sent_at, sent_p50_at, sent_p90_at)"
    " ON CONFLICT (session_id) DO UPDATE SET position = EXCLUDED.position,"
    "  p50_seconds = EXCLUDED.p50_seconds, p90_seconds = EXCLUDED.p90_seconds,"
    "  estimated_at = EXCLUDED.estimated_at,"
    "  sent_at = coalesce(EXCLUDED.sent_at, e.sent_at),"
    "  sent_p50_at = CASE WHEN EXCLUDED.sent_at IS NULL THEN e.sent_p50_at"
    "   ELSE EXCLUDED.sent_p50_at END,"
    "  sent_p90_at = CASE WHEN EXCLUDED.sent_at IS NULL THEN e.sent_p90_at"
    "   ELSE EXCLUDED.sent_p90_at END,"
    "  sent_count = e.sent_count + EXCLUDED.sent_count"
).bindparams(bindparam("ids"), bindparam("positions"))
# Rows of requests that no longer wait (admitted, ended, failed, or gone).
_FORGET = text(
    "DELETE FROM wait_estimates e WHERE NOT EXISTS"
    " (SELECT FROM sessions s WHERE s.id = e.session_id AND s.status = 'waiting')"
    " RETURNING e.session_id"
)


@dataclass(frozen=True)
class Stored:
    """What one pass wrote: estimates kept, ``session.waiting`` events queued, rows dropped."""

    estimated: int
    sent: int
    forgotten: int
    skipped: bool = False


def store_estimates(
    db: Database, snapshot: PoolSnapshot, estimates: Sequence[WaitEstimate]
) -> Stored:
    """Keep each still-waiting request's estimate, queue the events worth sending, and drop
    the rows of requests that stopped waiting; all in one transaction."""
    now = snapshot.now
    with db.transaction() as session:
        if not session.scalar(_LOCK, {"key": ESTIMATE_LOCK_KEY}):
            return Stored(0, 0, 0, skipped=True)
        forgotten = len(session.execute(_FORGET).all())
        by_id = {
            snapshot.requests[e.request_id].session_id: e
            for e in estimates
            if e.request_id in snapshot.requests
        }
        last = {
            r.id: _sent(r.sent_at, r.sent_p50_at, r.sent_p90_at)
            for r in session.execute(_STILL_WAITING, {"ids": list(by_id)})
        }
        columns: dict[str, list[object]] = {
            k: []
            for k in (
                "ids",
                "positions",
                "p50s",
                "p90s",
                "sent_ats",
                "sent_p50_ats",
                "sent_p90_ats",
            )
        }
        updates = []
        for session_id, quoted in last.items():
            estimate = by_id[session_id]
            send = should_resend(quoted, estimate, now.timestamp())
            columns["ids"].append(session_id)
            columns["positions"].append(estimate.position)
            columns["p50s"].append(_finite(estimate.p50))
            columns["p90s"].append(_finite(estimate.p90))
            columns["sent_ats"].append(now if send else None)
            columns["sent_p50_ats"].append(_after(now, estimate.p50) if send else None)
            columns["sent_p90_ats"].append(_after(now, estimate.p90) if send else None)
            if send:
                updates.append(_event(snapshot, estimate, now))
        if columns["ids"]:
            session.execute(_UPSERT, {"now": now, **columns})
        emit(session, updates, now)
    return Stored(len(last), len(updates), forgotten)


def _sent(
    sent_at: datetime | None, p50_at: datetime | None, p90_at: datetime | None
) -> SentQuote | None:
    """The last quote sent (an instant NULL: the wait had no end in sight)."""
    if sent_at is None:
        return None
    return SentQuote(
        sent_at=sent_at.timestamp(),
        p50_at=p50_at.timestamp() if p50_at is not None else math.inf,
        p90_at=p90_at.timestamp() if p90_at is not None else math.inf,
    )


def _finite(seconds: float) -> float | None:
    return seconds if math.isfinite(seconds) else None


def _after(now: datetime, seconds: float) -> datetime | None:
    return now + timedelta(seconds=seconds) if math.isfinite(seconds) else None


def _event(snapshot: PoolSnapshot, estimate: WaitEstimate, now: datetime) -> Update:
    request = snapshot.requests[estimate.request_id]
    return Update(
        status="waiting",
        request_id=request.request_id,
        vendor_session_id=None,
        expires_at=None,
        traceparent=request.traceparent,
        fields={
            "position": estimate.position,
            "wait_p50_seconds": _rounded(estimate.p50),
            "wait_p90_seconds": _rounded(estimate.p90),
            "estimated_at": now.astimezone(UTC),
        },
    )


def _rounded(seconds: float) -> float | None:
    """Seconds to a tenth (JSON has no infinity: a wait with no end in sight is null)."""
    return round(seconds, 1) if math.isfinite(seconds) else None


def latest_wait(session: Session, session_id: uuid.UUID) -> WaitEstimateRow | None:
    """A waiting request's latest estimate, if a pass has made one."""
    found = session.execute(
        text(
            "SELECT e.position, e.p50_seconds, e.p90_seconds, e.estimated_at"
            " FROM wait_estimates e JOIN sessions s ON s.id = e.session_id"
            " WHERE e.session_id = :id AND s.status = 'waiting'"
        ),
        {"id": session_id},
    ).one_or_none()
    if found is None:
        return None
    return WaitEstimateRow(
        position=int(found.position),
        p50_seconds=found.p50_seconds,
        p90_seconds=found.p90_seconds,
        estimated_at=found.estimated_at,
    )


@dataclass(frozen=True)
class WaitEstimateRow:
    """What status and the producer show of a waiting request's estimate."""

    position: int
    p50_seconds: float | None
    p90_seconds: float | None
    estimated_at: datetime
