"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, one per
live secret, space-separated (both are sent during a rotation)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from orchestrator.webhooks.secrets import secret_bytes


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of the specification (and the JSON content type)."""
    if not secrets:
        raise ValueError("an endpoint without a signing secret cannot be sent to")
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, webhook_id, timestamp, body) for s in secrets),
    }
