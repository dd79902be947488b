"""What a producer learns of a request (:class:`SessionInfo`), from its row or from its
lifecycle event; ``orchestrator.producer`` hands it out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orchestrator.db import SessionRow

if TYPE_CHECKING:
    from orchestrator.store.wait_estimates import WaitEstimateRow


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
    #: While waiting: the latest expected wait (docs/admission.md "The expected wait"):
    #: position (1 = next), p50 and p90 in seconds from ``estimated_at`` (None: none yet,
    #: or a p90 with no end in sight).
    position: int | None = None
    wait_p50_seconds: float | None = None
    wait_p90_seconds: float | None = None
    estimated_at: datetime | None = None

    def __repr__(self) -> str:  # the LiveKit token stays out of logs and tracebacks
        token = "set" if self.livekit_token else "none"
        return (
            f"SessionInfo(request_id={self.request_id!r}, status={self.status!r},"
            f" session_id={self.session_id!r}, room={self.livekit_room!r}, token={token},"
            f" expires_at={self.expires_at}, end_reason={self.end_reason!r},"
            f" error_code={self.error_code!r}, position={self.position!r},"
            f" wait_p50_seconds={self.wait_p50_seconds!r})"
        )

    @classmethod
    def from_event(cls, body: dict[str, Any]) -> SessionInfo:
        """From the body of a ``session.waiting|active|ended|failed`` event
        (docs/messages.md)."""
        expires = body.get("expires_at")
        estimated = body.get("estimated_at")
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
            position=_int_or_none(body.get("position")),
            wait_p50_seconds=_seconds_or_none(body.get("wait_p50_seconds")),
            wait_p90_seconds=_seconds_or_none(body.get("wait_p90_seconds")),
            estimated_at=datetime.fromisoformat(estimated) if estimated else None,
        )

    @classmethod
    def from_row(cls, row: SessionRow, wait: WaitEstimateRow | None = None) -> SessionInfo:
        """From the request's row, and its latest wait estimate while it waits."""
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
            position=wait.position if wait else None,
            wait_p50_seconds=wait.p50_seconds if wait else None,
            wait_p90_seconds=wait.p90_seconds if wait else None,
            estimated_at=wait.estimated_at if wait else None,
        )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _seconds_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
