"""``orchestrator webhooks``: add, list, rotate, disable, enable, replay as an operator runs
them; a secret is printed once and never listed."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from orchestrator.cli import main
from orchestrator.config import Settings
from orchestrator.db import Database
from tests.conftest import settings_env
from tests.webhooks.support import KEY, emit_events

pytestmark = pytest.mark.postgres


@pytest.fixture
def run(settings_for: Callable[..., Settings], wdb: Database) -> Callable[..., tuple[int, str]]:
    env = settings_env(settings_for())
    env["ORCHESTRATOR_WEBHOOK_SECRET_KEY"] = KEY
    env["ORCHESTRATOR_WEBHOOK_ALLOW"] = "hooks.internal"

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, ["webhooks", *args], env=env)
        return result.exit_code, result.output

    return invoke


def test_the_endpoint_commands(run: Callable[..., tuple[int, str]], wdb: Database) -> None:
    code, out = run("add", "https://hooks.example.com/in", "--event", "session.ended")
    assert code == 0, out
    endpoint = re.search(r"endpoint (\S+)", out).group(1)  # type: ignore[union-attr]
    secret = re.search(r"signing secret (whsec_\S+)", out).group(1)  # type: ignore[union-attr]

    code, out = run("list")
    assert code == 0 and endpoint in out and "enabled=True" in out and "signing_keys=1" in out
    assert secret not in out and secret.removeprefix("whsec_") not in out

    code, out = run("rotate", endpoint)
    new = re.search(r"signing secret (whsec_\S+)", out).group(1)  # type: ignore[union-attr]
    assert code == 0 and new != secret
    assert "signing_keys=2" in run("list")[1]

    code, out = run("disable", endpoint)
    assert code == 0 and "disabled" in out and "enabled=False" in run("list")[1]
    assert "disabled_reason=operator" in run("list")[1]
    code, out = run("enable", endpoint)
    assert code == 0 and "enabled=True" in run("list")[1]

    emit_events(wdb, "req-cli", ["ended"])
    with wdb.transaction() as session:
        event_id = session.execute(
            text("SELECT event_id::text FROM event_outbox WHERE routing_key = 'session.ended'")
        ).scalar()
    code, out = run("replay", "--event-id", str(event_id))
    assert code == 0 and out.strip() == "1 deliveries queued"
    code, out = run("replay", "--since", "2000-01-01T00:00:00")
    assert code == 0 and out.strip() == "0 deliveries queued"  # already pending


def test_refusals_are_one_line(run: Callable[..., tuple[int, str]]) -> None:
    code, out = run("add", "http://hooks.example.com/in")
    assert code == 1 and "plain http" in out and "Traceback" not in out
    code, out = run("add", "http://hooks.internal/in")  # allow-listed: plain http allowed
    assert code == 0, out
    code, out = run("disable", "00000000-0000-0000-0000-000000000000")
    assert code == 1 and "no webhook endpoint" in out
    code, out = run("replay")
    assert code == 2 and "--event-id or --since" in out


def test_the_key_is_required_to_add(settings_for: Callable[..., Settings], wdb: Database) -> None:
    env: dict[str, Any] = settings_env(settings_for())
    result = CliRunner().invoke(main, ["webhooks", "add", "https://h.example.com/"], env=env)
    assert result.exit_code == 1
    assert "ORCHESTRATOR_WEBHOOK_SECRET_KEY is required" in result.output
