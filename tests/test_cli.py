"""The command line as an operator uses it: one-line errors, readable output, no tokens."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from click.testing import CliRunner
from kombu import Connection

from orchestrator.cli import main
from orchestrator.config import Settings
from orchestrator.lifecycle import Lifecycle, handle_start_message
from orchestrator.messaging import START_QUEUE, work_queue
from tests.conftest import settings_env
from tests.helpers import row

pytestmark = pytest.mark.postgres


def run(settings: Settings, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=settings_env(settings))
    return result.exit_code, result.output


def test_status_and_sessions_show_the_row_but_sessions_hides_the_token(
    settings_for: Callable[..., Settings], lifecycle: Lifecycle
) -> None:
    handle_start_message(
        lifecycle, (), {"avatar_id": "cli-avatar", "request_id": "cli-1"}, claim_id="c"
    )
    token = row(lifecycle.db, "cli-1").livekit_token
    settings = settings_for()

    code, out = run(settings, "status", "cli-1")
    assert code == 0, out
    info = json.loads(out)
    assert info["status"] == "active" and info["livekit_token"] == token and info["expires_at"]

    code, out = run(settings, "sessions")
    assert code == 0 and "cli-1" in out and "active" in out and "cli-avatar" in out
    assert token not in out

    code, out = run(settings, "status", "nope")
    assert code == 1 and out.strip() == "Error: no session for request nope (yet)"


@pytest.mark.broker
def test_enqueue_publishes_a_start_job_and_rejects_bad_input_in_one_line(
    settings_for: Callable[..., Settings],
    broker_url: str,
    purge_queues: Callable[[], None],
    db: object,
) -> None:
    purge_queues()
    settings = settings_for(broker_url=broker_url)
    code, out = run(
        settings,
        "enqueue",
        "--avatar-id",
        "a1",
        "--request-id",
        "cli-q1",
        "--max-session-duration",
        "5",
    )
    assert code == 0, out
    assert out.strip() == "cli-q1"
    with Connection(broker_url) as conn:
        message = work_queue(START_QUEUE)(conn.default_channel).get(no_ack=True)
    assert message is not None
    assert message.headers["task"] == "orchestrator.start_session"
    assert json.loads(message.body)[1] == {
        "avatar_id": "a1",
        "request_id": "cli-q1",
        "max_session_duration": 5,
    }

    code, out = run(settings, "enqueue", "--avatar-id", "a1", "--max-session-duration", "999")
    assert code == 1
    assert out.strip().startswith("Error: 'max_session_duration'") and "\n" not in out.strip()

    code, out = run(settings, "stop")
    assert code == 2 and "exactly one of --request-id or --session-id" in out
