"""One HTTP attempt of a delivery: the payload signed with every live secret, POSTed with a
total time bound, no redirects followed, at most MAX_RESPONSE_BYTES of the answer read (and
thrown away: only its status is kept)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import httpx

from orchestrator.config import ConfigError
from orchestrator.webhooks.addresses import Refused
from orchestrator.webhooks.deliveries import Claimed
from orchestrator.webhooks.outcomes import Outcome
from orchestrator.webhooks.payload import payload_for
from orchestrator.webhooks.secrets import SecretBox
from orchestrator.webhooks.signing import headers

MAX_RESPONSE_BYTES = 4096
USER_AGENT = "session-orchestrator-webhooks/1"


class _TooSlow(Exception):
    pass


def attempt(client: httpx.Client, box: SecretBox, delivery: Claimed, *, timeout: float) -> Outcome:
    started = time.monotonic()
    try:
        code, retry_after = _post(client, box, delivery, started + timeout, timeout)
    except (Refused, ConfigError) as error:
        return Outcome(None, _ms(started), f"refused: {error}")
    except _TooSlow:
        return Outcome(None, _ms(started), f"no complete answer within {timeout:g} s")
    except httpx.TimeoutException as error:
        return Outcome(None, _ms(started), f"timeout: {type(error).__name__}")
    except httpx.HTTPError as error:
        return Outcome(None, _ms(started), f"{type(error).__name__}: {error}")
    return Outcome(code, _ms(started), None if 200 <= code < 300 else f"HTTP {code}", retry_after)


def _post(
    client: httpx.Client, box: SecretBox, delivery: Claimed, deadline: float, timeout: float
) -> tuple[int, str | None]:
    https = urlsplit(delivery.url).scheme == "https"
    body = payload_for(
        delivery.event_type, delivery.body, https=https, created_at=delivery.created_at.isoformat()
    )
    secrets = [box.decrypt(c) for c in delivery.ciphertexts]
    if not secrets:
        raise Refused("the endpoint has no live signing secret")
    signed = headers(secrets, delivery.webhook_id, int(time.time()), body)
    signed["user-agent"] = USER_AGENT
    with client.stream(
        "POST",
        delivery.url,
        content=body,
        headers=signed,
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
    ) as response:
        read = 0
        for chunk in response.iter_raw():
            read += len(chunk)
            if read >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            raise _TooSlow
        return response.status_code, response.headers.get("retry-after")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
