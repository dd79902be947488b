"""What we read from a JWT we did not sign (the vendor's session token, a LiveKit token):
its ``exp``, without verifying it. Neither the vendor client nor the lifecycle owns this:
both read expiries, one to refresh its token, the other to show when credentials lapse."""

from __future__ import annotations

from datetime import UTC, datetime

import jwt

__all__ = ["expires_at", "token_expiry"]


# ``exp`` outside these bounds is no time ``datetime`` can hold (year 1970 to 9999): ignored.
_LATEST_EXP = 253_402_300_799.0


def token_expiry(token: str) -> float | None:
    """The JWT's ``exp`` claim (epoch seconds), read without verifying it; None if absent or
    not a time (the token is the vendor's: ``inf``, 400 digits, 1e18 are read as absent)."""
    try:
        claims = jwt.decode(
            token, options={"verify_signature": False, "verify_exp": False}, algorithms=None
        )
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    try:
        seconds = float(exp)
    except OverflowError:
        return None
    return seconds if 0.0 <= seconds <= _LATEST_EXP else None


def expires_at(token: str) -> datetime | None:
    """The ``exp`` of a token as a time, read without verifying it (we only display it)."""
    exp = token_expiry(token)
    return datetime.fromtimestamp(exp, UTC) if exp is not None else None
