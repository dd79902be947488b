"""Session tokens: HS256 JWTs bound to the account whose key minted them."""

from __future__ import annotations

import time
import uuid
from typing import Final

import jwt

from orchestrator.simulator.accounts import SimulatorAccount

TOKEN_ISSUER: Final = "deepbrain-simulator"  # noqa: S105 - an issuer name, not a secret


def mint(secret: str, account: SimulatorAccount, ttl_seconds: float, generation: int) -> str:
    """A token for ``account``; ``generation`` is the account's revocation counter."""
    now = time.time()
    claims = {
        "iss": TOKEN_ISSUER,
        "sub": account.app_id,
        "acct": account.name,
        "iat": int(now),
        "exp": int(now + ttl_seconds),
        "jti": uuid.uuid4().hex,
        "gen": generation,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def claimed_account(secret: str, token: str) -> tuple[str, str, int] | None:
    """``(account name, appId, generation)`` of a token signed by ``secret`` and not yet
    expired, or None. The caller checks the account still has that appId and generation."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            issuer=TOKEN_ISSUER,
            options={"verify_exp": False, "require": ["exp", "sub", "gen", "acct"]},
        )
    except jwt.PyJWTError:
        return None
    exp, account, app_id, generation = (
        claims.get("exp"),
        claims.get("acct"),
        claims.get("sub"),
        claims.get("gen"),
    )
    if not isinstance(exp, int | float) or time.time() >= exp:
        return None
    if not isinstance(account, str) or not isinstance(app_id, str):
        return None
    if isinstance(generation, bool) or not isinstance(generation, int):
        return None
    return account, app_id, generation


def unverified_account(token: str) -> str | None:
    """The account a token names, without checking it (only to pick latency and faults;
    the handler checks the token before it acts)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    account = claims.get("acct")
    return account if isinstance(account, str) else None
