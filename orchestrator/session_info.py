"""What a producer learns of a request (:class:`SessionInfo`), from its row or from its
lifecycle event; ``orchestrator.producer`` hands it out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.db import SessionRow


@dataclass(frozen=True)
class SessionInfo:
    request_id: str
    status: str
    session_id: str | None = None
    livekit_url: str | None = None
    livekit_room: str | None = None
    livekit_token: str | None = None
    livekit_token_expires_at: datetime | None = None
    expires_at: datetime | None = None
    end_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    def __repr__(self) -> str:  # the LiveKit token stays out of logs and tracebacks
        token = "set" if self.livekit_token else "none"
        return (
            f"SessionInfo(request_id={self.request_id!r}, status={self.status!r},"
            f" session_id={self.session_id!r}, room={self.livekit_room!r}, token={token},"
            f" expires_at={self.expires_at}, end_reason={self.end_reason!r},"
            f" error_code={self.error_code!r})"
        )

    @classmethod
    def from_event(cls, body: dict[str, Any]) -> SessionInfo:
        """From the body of a ``session.active|ended|failed`` event (docs/messages.md)."""
        expires = body.get("expires_at")
        return cls(
            request_id=str(body["request_id"]),
            status=str(body["status"]),
            session_id=body.get("session_id"),
            livekit_url=body.get("url"),
            livekit_room=body.get("room_name"),
            livekit_token=body.get("token"),
            expires_at=datetime.fromisoformat(expires) if expires else None,
            end_reason=body.get("end_reason"),
            error_code=body.get("error_code"),
            error_message=body.get("error_message"),
        )

    @classmethod
    def from_row(cls, row: SessionRow) -> SessionInfo:
        return cls(
            request_id=row.request_id,
            status=row.status,
            session_id=row.vendor_session_id,
            livekit_url=row.livekit_url,
            livekit_room=row.livekit_room,
            livekit_token=row.livekit_token,
            livekit_token_expires_at=row.livekit_token_expires_at,
            expires_at=row.expires_at,
            end_reason=row.end_reason,
            error_code=row.error_code,
            error_message=row.error_message,
        )
