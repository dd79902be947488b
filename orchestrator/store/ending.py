"""The one way a session ends. Every terminal path — a stop the vendor confirmed, the reaper's,
an end the vendor made, a compensation, a failure, a stop before the start, a timeout — goes
through :func:`end`, which in the caller's transaction:

- moves the rows (still in one of ``from_statuses``) to ``ended`` or ``failed`` and clears
  their LiveKit token, attempt lease and stop retry;
- strips the secrets from their payloads (already gone once a start was recorded: then no
  statement is spent on it);
- writes one ``session_events`` row each and one outbox event each;
- asks for an admission pass after the commit if a live row ended (a slot is free).

One UPDATE … RETURNING for the whole lot, one INSERT into the history, one into the outbox:
the reaper ends a thousand sessions with the same three statements as one. A request that
cannot be started at all is born ``failed`` (:mod:`.invalid`): it has nothing to clear, and
its history row and event are written by :func:`announce`, the second half of :func:`end`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from orchestrator.contract import without_secrets
from orchestrator.db import LIVE_STATUSES, AfterCommit, EventKind, SessionRow, after_commit
from orchestrator.db.types import UTCDateTime
from orchestrator.events import outbox
from orchestrator.store import history
from orchestrator.store.rows import SESSIONS, S

_LIVE = frozenset(s.value for s in LIVE_STATUSES)


@dataclass(frozen=True)
class Ended:
    """A row :func:`end` ended, as the statement returned it."""

    session_id: uuid.UUID
    request_id: str
    vendor_session_id: str | None
    status: str
    status_before: str
    end_reason: str | None
    error_code: str | None
    error_message: str | None
    expires_at: datetime | None
    ended_at: datetime
    traceparent: str | None

    @property
    def lag_seconds(self) -> float | None:
        """``ended_at`` - ``expires_at`` (the database's clock): how late the end came."""
        if self.expires_at is None:
            return None
        return (self.ended_at - self.expires_at).total_seconds()


def _statement(with_ended_at: bool) -> Any:
    before = (
        select(SESSIONS.c.id, SESSIONS.c.status)
        .where(
            SESSIONS.c.id.in_(bindparam("ids", expanding=True)),
            SESSIONS.c.status.in_(bindparam("from_statuses", expanding=True)),
        )
        .with_for_update()
        .cte("before")
    )
    ended_at = bindparam("ended_at", type_=UTCDateTime()) if with_ended_at else func.now()
    return (
        update(SESSIONS)
        .where(SESSIONS.c.id == before.c.id)
        .values(
            status=bindparam("status"),
            ended_at=ended_at,
            end_reason=func.coalesce(bindparam("end_reason"), SESSIONS.c.end_reason),
            error_code=func.coalesce(bindparam("error_code"), SESSIONS.c.error_code),
            error_message=func.coalesce(bindparam("error_message"), SESSIONS.c.error_message),
            livekit_token=None,
            stop_retry_at=None,
            attempt_lease_until=None,
        )
        .returning(
            SESSIONS.c.id,
            SESSIONS.c.request_id,
            SESSIONS.c.vendor_session_id,
            SESSIONS.c.status,
            before.c.status.label("status_before"),
            SESSIONS.c.end_reason,
            SESSIONS.c.error_code,
            SESSIONS.c.error_message,
            SESSIONS.c.expires_at,
            SESSIONS.c.ended_at,
            SESSIONS.c.traceparent,
            SESSIONS.c.request_payload,
            func.now().label("now"),
        )
    )


_END = _statement(with_ended_at=False)
_END_AT = _statement(with_ended_at=True)
_STRIP = (
    update(SESSIONS)
    .where(SESSIONS.c.id == bindparam("row_id"))
    .values(request_payload=bindparam("payload"))
)


def end(
    session: Session,
    ids: Iterable[uuid.UUID],
    status: S,
    *,
    from_statuses: Iterable[S],
    end_reason: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    ended_at: datetime | None = None,
    detail: Mapping[str, Any] | None = None,
    detail_of: Mapping[uuid.UUID, Mapping[str, Any]] | None = None,
) -> list[Ended]:
    """End the rows of ``ids`` still in one of ``from_statuses`` (see the module's text); the
    rows ended, in no particular order. ``end_reason``, ``error_code`` and ``error_message``
    replace the row's only when given; ``ended_at`` defaults to the database's ``now()``.
    ``detail`` goes into every history row, ``detail_of[id]`` into that row's."""
    assert status in (S.ENDED, S.FAILED)
    ids = list(ids)
    if not ids:
        return []
    session.flush()  # an ORM row's pending changes first: the statement reads the row
    params: dict[str, Any] = {
        "ids": ids,
        "from_statuses": [s.value for s in from_statuses],
        "status": status.value,
        "end_reason": end_reason,
        "error_code": error_code,
        "error_message": error_message,
    }
    statement = _END if ended_at is None else _END_AT
    if ended_at is not None:
        params["ended_at"] = ended_at
    rows = session.connection().execute(statement, params).all()
    stripped = [
        {"row_id": r.id, "payload": clean}
        for r in rows
        if (clean := without_secrets(r.request_payload)) != r.request_payload
    ]
    if stripped:
        session.connection().execute(_STRIP, stripped)
    ended = [
        Ended(
            session_id=r.id,
            request_id=r.request_id,
            vendor_session_id=r.vendor_session_id,
            status=r.status,
            status_before=r.status_before,
            end_reason=r.end_reason,
            error_code=r.error_code,
            error_message=r.error_message,
            expires_at=r.expires_at,
            ended_at=r.ended_at,
            traceparent=r.traceparent,
        )
        for r in rows
    ]
    _sync_loaded_rows(session, ended, {s["row_id"]: s["payload"] for s in stripped})
    if rows:
        announce(session, ended, rows[0].now, detail=detail, detail_of=detail_of)
    return ended


def end_row(
    session: Session,
    row: SessionRow,
    status: S,
    *,
    end_reason: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    ended_at: datetime | None = None,
    **detail: Any,
) -> None:
    """:func:`end` for one row the caller holds locked (its ORM object then shows the end)."""
    ended = end(
        session,
        [row.id],
        status,
        from_statuses=[S(row.status)],
        end_reason=end_reason,
        error_code=error_code,
        error_message=error_message,
        ended_at=ended_at,
        detail=detail,
    )
    assert ended, "the caller holds the row locked"


def announce(
    session: Session,
    ended: Sequence[Ended],
    now: datetime,
    *,
    detail: Mapping[str, Any] | None = None,
    detail_of: Mapping[uuid.UUID, Mapping[str, Any]] | None = None,
) -> None:
    """The history rows and the outbox events of rows that ended (``now``: the database's);
    an admission pass after the commit if a live one did."""
    for kind in (EventKind.ENDED, EventKind.FAILED):
        history.log_now(
            session,
            kind,
            [
                history.Entry(
                    e.session_id,
                    e.vendor_session_id,
                    {
                        "end_reason": e.end_reason,
                        "error_code": e.error_code,
                        **(detail or {}),
                        **((detail_of or {}).get(e.session_id) or {}),
                    },
                )
                for e in ended
                if _kind(e.status) is kind
            ],
        )
    outbox.emit(
        session,
        [
            outbox.Update(
                e.status,
                e.request_id,
                e.vendor_session_id,
                e.expires_at,
                e.traceparent,
                {
                    "end_reason": e.end_reason,
                    "error_code": e.error_code,
                    "error_message": e.error_message,
                },
            )
            for e in ended
        ],
        now,
    )
    if any(e.status_before in _LIVE for e in ended):
        after_commit(session, AfterCommit.SLOT_FREED)


def _kind(status: str) -> EventKind:
    return EventKind.ENDED if status == S.ENDED.value else EventKind.FAILED


def _sync_loaded_rows(
    session: Session, ended: Sequence[Ended], payloads: Mapping[uuid.UUID, Any]
) -> None:
    """A caller holding a row as an ORM object sees what the statement wrote (no reload)."""
    for e in ended:
        row = session.identity_map.get(session.identity_key(SessionRow, e.session_id))
        if row is None:
            continue
        assert isinstance(row, SessionRow)
        for name, value in (
            ("status", e.status),
            ("ended_at", e.ended_at),
            ("end_reason", e.end_reason),
            ("error_code", e.error_code),
            ("error_message", e.error_message),
            ("livekit_token", None),
            ("stop_retry_at", None),
            ("attempt_lease_until", None),
        ):
            set_committed_value(row, name, value)
        if e.session_id in payloads:
            set_committed_value(row, "request_payload", payloads[e.session_id])
