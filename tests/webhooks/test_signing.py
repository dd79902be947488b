"""Signatures per the Standard Webhooks specification: its published test vector, and the
official ``standardwebhooks`` package verifying what we sign, during a rotation too."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from orchestrator.config import ConfigError
from orchestrator.webhooks.payload import payload_for
from orchestrator.webhooks.secrets import SecretBox, new_key, new_secret
from orchestrator.webhooks.signing import headers, signature

# The specification's vector (standard-webhooks, libraries/python/tests/test_webhooks.py,
# test_sign_function; the same in every library of the repository).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specification_test_vector() -> None:
    assert signature(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    # The prefix is optional for the key, as in the reference libraries.
    assert (
        signature(VECTOR_SECRET.removeprefix("whsec_"), VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
        == VECTOR_SIGNATURE
    )


def test_the_reference_library_verifies_what_we_sign() -> None:
    secret = new_secret()
    body = payload_for(
        "session.ended", {"event_id": "e1", "occurred_at": "2026-12-06T00:00:00+00:00"}, https=True
    )
    signed = headers([secret], "e1", int(time.time()), body)
    assert Webhook(secret).verify(body, signed)["type"] == "session.ended"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, signed)
    with pytest.raises(WebhookVerificationError):  # the body is what is signed
        Webhook(secret).verify(body.replace(b"ended", b"endex"), signed)


def test_during_a_rotation_both_secrets_verify() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"type":"session.active","timestamp":null,"data":{}}'
    signed = headers([new, old], "e2", int(time.time()), body)
    assert len(signed["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(body, signed)


def test_no_secret_no_signature() -> None:
    with pytest.raises(ValueError, match="signing secret"):
        headers([], "e3", 0, b"{}")


def test_secrets_are_encrypted_and_the_key_is_required() -> None:
    box = SecretBox(SecretStr(new_key()))
    secret = new_secret()
    sealed = box.encrypt(secret)
    assert secret not in sealed and secret.removeprefix("whsec_") not in sealed
    assert box.decrypt(sealed) == secret
    with pytest.raises(ConfigError, match="ORCHESTRATOR_WEBHOOK_SECRET_KEY"):
        SecretBox(None)
    with pytest.raises(ConfigError, match="not a Fernet key"):
        SecretBox(SecretStr("changeme"))
    with pytest.raises(ConfigError, match="does not decrypt"):
        SecretBox(SecretStr(new_key())).decrypt(sealed)


def test_the_payload_keeps_the_token_to_https_only() -> None:
    body = {
        "event_id": "e",
        "occurred_at": "t",
        "status": "active",
        "token": "LK-TOKEN",
        "url": "wss://lk",
        "room_name": "r",
    }
    assert (
        json.loads(payload_for("session.active", body, https=True))["data"]["token"] == "LK-TOKEN"
    )
    plain = json.loads(payload_for("session.active", body, https=False))
    assert plain == {"type": "session.active", "timestamp": "t", "data": {**body, "token": None}}
