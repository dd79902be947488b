"""What a webhook says: the specification's shape ``{type, timestamp, data}``, where ``type``
is the event's routing key, ``timestamp`` its ``occurred_at`` and ``data`` the event's body
as the exchange carries it (docs/messages.md, "Webhooks").

``session.active`` carries the LiveKit token on the exchange. Over HTTP it carries it only to
``https://`` endpoints; a plain-HTTP endpoint (allowed only when allow-listed, on premises)
gets ``token: null``: the token is a bearer credential to the room, and plain HTTP shows it to
every hop on the way. The URL and room name stay, so such a receiver can still match the
session and fetch credentials through its own back end."""

from __future__ import annotations

import json
from typing import Any

SECRET_OVER_PLAIN_HTTP = ("token",)


def payload_for(
    event_type: str, body: dict[str, Any], *, https: bool, created_at: str | None = None
) -> bytes:
    """The request body: compact JSON, UTF-8."""
    data = dict(body)
    if not https:
        for key in SECRET_OVER_PLAIN_HTTP:
            if key in data:
                data[key] = None
    document = {
        "type": event_type,
        "timestamp": body.get("occurred_at") or created_at,
        "data": data,
    }
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
