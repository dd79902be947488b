"""Webhook tests: the run's database with the webhook tables emptied, settings that allow the
loopback receivers, senders closed after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from orchestrator.db import Database
from orchestrator.webhooks.secrets import SecretBox
from orchestrator.webhooks.sender import Sender
from orchestrator.webhooks.settings import WebhookSettings, load_webhook_settings
from tests.webhooks.support import KEY


def _empty_webhook_tables(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE webhook_endpoints, webhook_secrets, webhook_deliveries,"
                " webhook_attempts RESTART IDENTITY CASCADE"
            )
        )


@pytest.fixture
def wdb(db: Database) -> Iterator[Database]:
    """The run's database with no endpoint before the test, and none left after it."""
    _empty_webhook_tables(db)
    yield db
    _empty_webhook_tables(db)


@pytest.fixture
def webhook_settings() -> Callable[..., WebhookSettings]:
    def make(**overrides: Any) -> WebhookSettings:
        values: dict[str, Any] = {
            "secret_key": KEY,
            "allow": "127.0.0.0/8,127.0.0.1",
            "timeout_seconds": 2.0,
            "poll_interval_seconds": 0.05,
        }
        values.update(overrides)
        return load_webhook_settings(**values)

    return make


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(SecretStr(KEY))


@pytest.fixture
def make_sender(wdb: Database) -> Iterator[Callable[..., Sender]]:
    made: list[Sender] = []

    def make(settings: WebhookSettings, **kwargs: Any) -> Sender:
        sender = Sender(wdb, settings, **kwargs)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        sender.close()
