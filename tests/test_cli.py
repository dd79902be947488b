"""The command line as an operator uses it: one-line errors, readable output, no tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from kombu import Connection

from orchestrator.cli import EXIT_SESSION_FAILED, main
from orchestrator.config import Settings
from orchestrator.contract import is_valid_stop_reason
from orchestrator.lifecycle import Lifecycle, handle_start_message
from orchestrator.messaging import START_QUEUE, Topology
from orchestrator.simulator import SimulatorServer
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
        message = Topology().work_queue(START_QUEUE)(conn.default_channel).get(no_ack=True)
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


def test_sessions_json_has_full_ids_utc_times_and_no_token(
    settings_for: Callable[..., Settings], lifecycle: Lifecycle
) -> None:
    long_id = "order-2026-12-01-customer-4711-avatar-session"  # longer than the table shows
    handle_start_message(
        lifecycle, (), {"avatar_id": "json-avatar", "request_id": long_id}, claim_id="j"
    )
    stored = row(lifecycle.db, long_id)
    settings = settings_for()

    code, out = run(settings, "sessions", "--json")
    assert code == 0, out
    [record] = json.loads(out)
    assert record["request_id"] == long_id and record["session_id"] == stored.vendor_session_id
    assert record["status"] == "active" and record["avatar_id"] == "json-avatar"
    assert record["started_at"].endswith("Z") and record["expires_at"].endswith("Z")
    assert datetime.fromisoformat(record["expires_at"]) == stored.expires_at
    assert "livekit_token" not in record and stored.livekit_token not in out

    code, table = run(settings, "sessions")
    assert long_id not in table  # the table cuts ids short; --json does not
    clock = stored.expires_at.astimezone(UTC).strftime("%H:%M:%SZ")
    assert clock in table  # the table's times are UTC, labelled Z like the JSON's

    code, out = run(settings, "status", long_id)
    info = json.loads(out)
    assert info["expires_at"] == record["expires_at"]
    assert info["livekit_token_expires_at"].endswith("Z")


def test_status_of_a_failed_request_exits_3(
    settings_for: Callable[..., Settings], lifecycle: Lifecycle
) -> None:
    handle_start_message(lifecycle, (), {"request_id": "cli-failed"}, claim_id="f")  # no avatar_id
    code, out = run(settings_for(), "status", "cli-failed")
    assert code == EXIT_SESSION_FAILED
    info = json.loads(out)
    assert (info["status"], info["error_code"]) == ("failed", "VALIDATION_ERROR")


@pytest.mark.broker
def test_enqueue_wait_exits_3_when_the_request_failed(
    settings_for: Callable[..., Settings],
    broker_url: str,
    purge_queues: Callable[[], None],
    db: object,
    simulator: SimulatorServer,
    start_worker: Callable[..., object],
) -> None:
    purge_queues()
    settings = settings_for(broker_url=broker_url, orphan_grace_seconds=5.0)
    start_worker(settings)
    code, out = run(settings, "enqueue", "--avatar-id", "a", "--wait", "20")
    assert code == 0, out
    assert json.loads(out.split("\n", 1)[1])["status"] == "active"
    simulator.push_fault({"endpoint": "start", "status": 402, "code": 4020})
    code, out = run(settings, "enqueue", "--avatar-id", "a", "--wait", "20")
    assert code == EXIT_SESSION_FAILED, out
    assert json.loads(out.split("\n", 1)[1])["error_code"] == "VENDOR_4020"


def test_stop_reason_is_checked_before_anything_is_sent(tmp_path: Path) -> None:
    # The broker does not exist: a reason refused locally never tries to reach it.
    env = {"ORCHESTRATOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}
    env["ORCHESTRATOR_STATE_DIR"] = str(tmp_path)
    for reason in ("user closed", "user_closed", "X" * 65):
        started = time.monotonic()
        result = CliRunner().invoke(
            main, ["stop", "--request-id", "r", "--reason", reason], env=env
        )
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--reason': upper-case letters, digits and _" in result.output
        assert time.monotonic() - started < 5
    assert is_valid_stop_reason("USER_CLOSED") and not is_valid_stop_reason("user_closed")
