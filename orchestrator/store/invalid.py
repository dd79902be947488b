"""A message that decoded but cannot be started: a ``failed`` row that says why, born ended
(its history row and event written by :func:`.ending.announce`, as every end's)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from orchestrator.contract import storable
from orchestrator.db import Database, EventKind, SessionRow
from orchestrator.store import history
from orchestrator.store.ending import Ended, announce
from orchestrator.store.rows import S, db_now, insert_ignoring_conflict


def record_invalid(
    db: Database,
    *,
    request_id: str,
    claim_id: str,
    payload: dict[str, Any],
    digest: str,
    error_code: str,
    message: str,
    traceparent: str | None,
) -> uuid.UUID | None:
    """A message that decoded but cannot be started becomes a ``failed`` row (its payload kept
    as storable text, without secrets)."""
    payload = storable(payload)
    message = storable(message)
    avatar = payload.get("avatar_id")
    with db.transaction() as session:
        now = db_now(session)
        new_id = session.execute(
            insert_ignoring_conflict(
                {
                    "id": uuid.uuid4(),
                    "request_id": request_id,
                    "claim_id": claim_id,
                    "status": S.FAILED.value,
                    "avatar_id": avatar if isinstance(avatar, str) else None,
                    "request_payload": payload,
                    "payload_sha256": digest,
                    "error_code": error_code,
                    "error_message": message,
                    "traceparent": traceparent,
                    "created_at": now,
                    "ended_at": now,
                }
            )
        ).scalar_one_or_none()
        if new_id is None:
            row = session.scalars(
                select(SessionRow).where(SessionRow.request_id == request_id)
            ).one()
            if row.claim_id != claim_id:
                history.log(
                    session, EventKind.DUPLICATE_CONFLICT, row=row, claim_id=claim_id, error=message
                )
            return None
        ended = Ended(
            session_id=uuid.UUID(str(new_id)),
            request_id=request_id,
            vendor_session_id=None,
            status=S.FAILED.value,
            status_before=S.FAILED.value,  # born ended: no slot was held
            end_reason=None,
            error_code=error_code,
            error_message=message,
            expires_at=None,
            ended_at=now,
            traceparent=traceparent,
        )
        announce(session, [ended], now, detail={"error": message})
        return ended.session_id
