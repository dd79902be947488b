"""Secrets: whole sessions run with known secret values — appId, userKey, the vendor's session
tokens (read from the simulator as it mints them), the LiveKit tokens, and the customer's LLM
keys inside ``custom_http`` (``headers``, ``extra_headers``, ``auth_plugins``) — including
failure paths that echo secrets back (a vendor error message, a failing stop, rejected and
dead-lettered messages). Then every place the service writes is searched: worker logs (INFO
and DEBUG), span attributes and events, exception texts, ``sessions`` (``livekit_token``
only while active), ``session_events``, ``event_outbox`` (only ``session.active`` may carry
the LiveKit token), the admin views and the CLI's session table. Zero hits.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from click.testing import CliRunner
from sqlalchemy import text

from orchestrator.cli import main as cli
from orchestrator.config import Settings, load_settings
from orchestrator.deepbrain import DeepBrainClient, DeepBrainError
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from tests.amqp import publish_raw, purge_work_queues
from tests.conftest import WorkerProcess, settings_env
from tests.faults.conftest import (
    rows_by_request,
    table_dump,
    wait_settled,
)
from tests.faults.test_bad_input import fresh_database, wait_rows

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

APP_SECRET = "appid-SECRET-5f2c9a17"
USER_SECRET = "userkey-SECRET-8e71d0c4"
LLM_HEADER_SECRET = "sk-llm-SECRET-3b9e4f21"
LLM_EXTRA_SECRET = "xh-SECRET-77aa1290"
LLM_PLUGIN_SECRET = "plugin-SECRET-c0ffee55"
PERSONA = {
    "language": "en",
    "llm_configurations": {
        "provider": "custom",
        "custom_http": {
            "endpoint": "https://llm.customer.example/v1/chat",
            "api_preset": "openai_compatible",
            "headers": {"Authorization": f"Bearer {LLM_HEADER_SECRET}"},
            "extra_headers": {"X-Api-Key": LLM_EXTRA_SECRET},
            "auth_plugins": [{"kind": "static", "key": LLM_PLUGIN_SECRET}],
        },
    },
}


@dataclass
class SecretRun:
    level: str
    secrets: dict[str, str]  # what → value (session and LiveKit tokens numbered)
    livekit_tokens: set[str]
    worker_log: str
    spans: str  # the worker's finished spans, one JSON object a line (attributes, events)
    test_process_log: str
    sessions_while_active: str  # every column but livekit_token
    sessions_after: str
    session_events: str
    outbox: list[tuple[str, str]]  # (routing key, body as JSON)
    admin_views: str
    cli_table: str
    exception_texts: list[str]
    statuses: dict[str, str]
    vendor_stats: dict[str, Any]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def run_scenario(level: str, state: Path, database_url: str, broker_url: str) -> SecretRun:
    config = SimulatorConfig(
        app_id=APP_SECRET,
        user_key=USER_SECRET,
        max_concurrent_sessions=50,
        idle_timeout_seconds=None,
    )
    collect = _Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        with SimulatorServer(config) as sim:
            minted: list[str] = []
            mint = sim.state.mint_session_token

            def recording_mint(account: str | None = None) -> str:
                token = mint(account)
                minted.append(token)
                return token

            sim.state.mint_session_token = recording_mint  # type: ignore[method-assign]
            return _scenario(level, state, database_url, broker_url, sim, minted, collect)
    finally:
        root.removeHandler(collect)
        root.setLevel(old_level)


def _scenario(
    level: str,
    state: Path,
    database_url: str,
    broker_url: str,
    sim: SimulatorServer,
    minted: list[str],
    collect: _Collect,
) -> SecretRun:
    db = fresh_database(database_url)
    purge_work_queues(broker_url)
    settings: Settings = load_settings(
        state_dir=state,
        database_url=database_url,
        broker_url=broker_url,
        deepbrain_base_url=sim.base_url,
        deepbrain_app_id=APP_SECRET,
        deepbrain_user_key=USER_SECRET,
        log_level=level,
        reaper_interval_seconds=0.5,
        reconcile_interval_seconds=2,
        orphan_grace_seconds=1,
        stop_retry_seconds=10,  # no second stop while the first one still retries
        vendor_timeout_seconds=1,  # no more than the orphan grace (checked at start)
    )
    span_file = state / "spans.jsonl"
    worker = WorkerProcess(
        settings,
        state / "worker.log",
        "--beat",
        env_extra={"ORCHESTRATOR_TRACE_FILE": str(span_file), "OTEL_TRACES_EXPORTER": "none"},
    )
    producer = Producer(settings)
    try:
        producer.enqueue_start_session(
            request_id="s-reaped", avatar_id="a", avatar_persona=PERSONA, max_duration_seconds=2
        )
        producer.enqueue_start_session(
            request_id="s-stopped", avatar_id="a", avatar_persona=PERSONA
        )
        wait_rows(db, ["s-reaped", "s-stopped"], "active", 30)
        sessions_while_active = table_dump(db, "sessions", exclude=("livekit_token",))

        # A vendor error that echoes the account secrets back.
        sim.push_fault(
            {
                "endpoint": "start",
                "status": 400,
                "code": 4000,
                "message": f"appId {APP_SECRET} / userKey {USER_SECRET} not allowed;"
                f" custom_http {json.dumps(PERSONA)} rejected",  # it echoes the request
            }
        )
        producer.enqueue_start_session(
            request_id="s-vendor-error", avatar_id="a", avatar_persona=PERSONA
        )
        wait_rows(db, ["s-vendor-error"], "failed", 20)
        # A revoked session token: refreshed once (the refresh path logs too).
        sim.revoke_tokens()
        producer.enqueue_start_session(
            request_id="s-refreshed", avatar_id="a", avatar_persona=PERSONA, max_duration_seconds=1
        )
        # Rejected and dead-lettered messages that carry the customer's keys.
        publish_raw(
            broker_url,
            {"request_id": "s-invalid", "avatar_id": "a", "avatar_persona": PERSONA, "x": 1},
        )
        publish_raw(
            broker_url,
            body=pickle.dumps([[], {"avatar_persona": PERSONA}, {}]),
            content_type="application/x-python-serialize",
        )
        publish_raw(broker_url, {"avatar_persona": PERSONA}, task="orchestrator.no_such_task")
        publish_raw(broker_url, body=b'[[], {"avatar_persona": ' + json.dumps(PERSONA).encode())
        wait_settled(
            db,
            ["s-reaped", "s-refreshed", "s-vendor-error", "s-invalid"],
            timeout=30,
            allowed=("ended", "failed"),
        )
        # A stop that fails (every retry) with the userKey in the vendor's message; the reaper
        # retries it after the backoff and it succeeds.
        sim.push_fault(
            {
                "endpoint": "stop",
                "status": 500,
                "code": 5000,
                "message": f"stop failed for key {USER_SECRET}",
                "count": 4,  # the client's attempts for one stop
            }
        )
        producer.request_stop(request_id="s-stopped")
        wait_rows(db, ["s-stopped"], "ended", 30)
        time.sleep(1.0)  # the last outbox relay and log lines
    finally:
        producer.close()
        worker.stop()

    with db.engine.connect() as conn:
        outbox = [
            (r.routing_key, json.dumps(r.body))
            for r in conn.execute(text("SELECT routing_key, body FROM event_outbox"))
        ]
        views = conn.execute(
            text(
                "SELECT table_name FROM information_schema.views"
                " WHERE table_schema = 'public' AND table_name LIKE 'admin\\_%'"
            )
        ).scalars()
        admin_views = "\n".join(table_dump(db, name) for name in views)
    cli_table = CliRunner().invoke(cli, ["sessions", "--all"], env=settings_env(settings)).output

    exception_texts = []
    with DeepBrainClient(sim.base_url, APP_SECRET, USER_SECRET, timeout_seconds=5) as client:
        for fault in (
            {"endpoint": "token", "status": 401, "message": f"bad {APP_SECRET}:{USER_SECRET}"},
            {"endpoint": "list", "status": 403, "code": 4030, "message": f"key {USER_SECRET}"},
        ):
            sim.push_fault(fault)
            try:
                if fault["endpoint"] == "token":
                    client.start_session({"avatar_id": "a"})
                else:
                    client.list_sessions()
            except DeepBrainError as error:
                exception_texts += [str(error), repr(error), error.vendor_message]
        exception_texts.append(repr(client))
    exception_texts.append(
        repr(load_settings(deepbrain_app_id=APP_SECRET, deepbrain_user_key=USER_SECRET))
    )

    vendor_stats = sim.stats()["endpoints"]
    livekit_tokens = {s["livekit_token"] for s in sim.sessions()}
    secrets = {
        "appId": APP_SECRET,
        "userKey": USER_SECRET,
        "custom_http headers": LLM_HEADER_SECRET,
        "custom_http extra_headers": LLM_EXTRA_SECRET,
        "custom_http auth_plugins": LLM_PLUGIN_SECRET,
    }
    secrets.update({f"session token {i}": t for i, t in enumerate(minted)})
    secrets.update({f"LiveKit token {i}": t for i, t in enumerate(sorted(livekit_tokens))})
    statuses = {k: v.status for k, v in rows_by_request(db).items()}
    result = SecretRun(
        level=level,
        secrets=secrets,
        livekit_tokens=livekit_tokens,
        worker_log=worker.log(),
        spans=span_file.read_text() if span_file.exists() else "",
        test_process_log="\n".join(collect.lines),
        sessions_while_active=sessions_while_active,
        sessions_after=table_dump(db, "sessions"),
        session_events=table_dump(db, "session_events"),
        outbox=outbox,
        admin_views=admin_views,
        cli_table=cli_table,
        exception_texts=exception_texts,
        statuses=statuses,
        vendor_stats=vendor_stats,
    )
    db.dispose()
    return result


def hits(run: SecretRun, haystack: str, *, allowed: set[str] = frozenset()) -> list[str]:
    """Names of the secrets found in ``haystack`` (a JWT is also searched by its signature)."""
    found = []
    for name, value in run.secrets.items():
        if value in allowed:
            continue
        needles = {value}
        if value.count(".") == 2:  # a JWT: its signature alone is as good as the whole
            needles.add(value.rsplit(".", 1)[1])
        if any(n and n in haystack for n in needles):
            found.append(name)
    return found


@pytest.fixture(scope="module")
def info_run(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, broker_url: str
) -> SecretRun:
    return run_scenario("INFO", tmp_path_factory.mktemp("secrets-info"), database_url, broker_url)


@pytest.fixture(scope="module")
def debug_run(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, broker_url: str
) -> SecretRun:
    return run_scenario("DEBUG", tmp_path_factory.mktemp("secrets-debug"), database_url, broker_url)


def test_the_scenario_used_every_secret(info_run: SecretRun) -> None:
    run = info_run
    assert run.statuses == {
        "s-reaped": "ended",
        "s-stopped": "ended",
        "s-vendor-error": "failed",
        "s-refreshed": "ended",
        "s-invalid": "failed",
    }
    assert sum(name.startswith("session token") for name in run.secrets) >= 2  # refreshed
    assert len(run.livekit_tokens) == 3
    assert "stop_attempt_failed" in run.session_events  # the failing stop really failed
    assert run.vendor_stats["stop"]["statuses"]["500"] == 4
    assert run.vendor_stats["start"]["statuses"]["401"] == 1  # the revoked token
    assert "undecodable message dead-lettered" in run.worker_log
    assert "unknown task" in run.worker_log


def test_worker_log_at_info_has_no_secret(info_run: SecretRun) -> None:
    assert hits(info_run, info_run.worker_log) == []


def test_worker_log_at_debug_has_no_secret(debug_run: SecretRun) -> None:
    log = debug_run.worker_log  # it really ran at DEBUG (JSON lines or text, as configured)
    assert log.count(" DEBUG ") + log.count('"level": "DEBUG"') > 50
    assert hits(debug_run, debug_run.worker_log) == []


def test_span_attributes_have_no_secret(info_run: SecretRun) -> None:
    spans = [json.loads(line) for line in info_run.spans.splitlines() if line.strip()]
    assert len(spans) > 20 and any(s["attributes"] for s in spans)
    assert hits(info_run, info_run.spans) == []


def test_producer_process_log_at_debug_has_no_secret(debug_run: SecretRun) -> None:
    assert hits(debug_run, debug_run.test_process_log) == []


def test_exception_texts_have_no_secret(info_run: SecretRun) -> None:
    assert len(info_run.exception_texts) >= 7
    assert hits(info_run, "\n".join(info_run.exception_texts)) == []


def test_sessions_table_has_no_secret_but_the_livekit_token_while_active(
    info_run: SecretRun,
) -> None:
    assert hits(info_run, info_run.sessions_while_active) == []
    assert hits(info_run, info_run.sessions_after) == []  # the LiveKit token is cleared at the end


def test_session_events_have_no_secret(info_run: SecretRun) -> None:
    assert hits(info_run, info_run.session_events) == []


def test_outbox_carries_the_livekit_token_in_session_active_only(info_run: SecretRun) -> None:
    run = info_run
    assert {key for key, _ in run.outbox} == {"session.active", "session.ended", "session.failed"}
    for key, body in run.outbox:
        allowed = run.livekit_tokens if key == "session.active" else set()
        assert hits(run, body, allowed=allowed) == [], key


def test_admin_views_and_cli_table_have_no_secret(info_run: SecretRun) -> None:
    assert hits(info_run, info_run.admin_views) == []
    assert "s-reaped" in info_run.cli_table
    assert hits(info_run, info_run.cli_table) == []


# -- a vendor that echoes the request (in process, respx at the HTTP boundary) ----------------

SHORT_SECRET = "pin4"  # short values are masked as whole words (orchestrator/masking.py)
ECHO_PERSONA = {
    "language": "en",
    "llm_configurations": {
        "provider": "custom",
        "custom_http": {
            "endpoint": "https://llm.customer.example/v1/chat",
            "headers": {"Authorization": f"Bearer {LLM_HEADER_SECRET}", "X-Pin": SHORT_SECRET},
            "extra_headers": {"X-Api-Key": LLM_EXTRA_SECRET},
            "auth_plugins": [{"kind": "static", "key": LLM_PLUGIN_SECRET, "n": 12345678}],
        },
    },
}
ECHO_SECRETS = {
    "headers": LLM_HEADER_SECRET,
    "extra_headers": LLM_EXTRA_SECRET,
    "auth_plugins": LLM_PLUGIN_SECRET,
    "a number in auth_plugins": "12345678",
}


def echo(request: httpx.Request, status: int, code: int) -> httpx.Response:
    """The vendor's error quotes the request: as JSON, with its spaces changed, and once as
    a bare header value."""
    sent = request.content.decode()
    message = (
        f"bad persona: {sent} / {' '.join(sent.split())} / key {LLM_EXTRA_SECRET} /"
        f" pin {SHORT_SECRET}."
    )
    return httpx.Response(status, json={"code": code, "message": message, "data": None})


@pytest.mark.parametrize(("status", "code"), [(400, 4000), (500, 5000)], ids=["4xx", "5xx"])
def test_a_vendor_error_echoing_the_request_leaks_no_customer_key(
    settings_for: Any, db: Any, caplog: pytest.LogCaptureFixture, status: int, code: int
) -> None:
    """The customer's keys the vendor echoes in its error reach no row, event, log line or
    exception text: every secret value the request carried is masked by value."""
    from orchestrator.lifecycle import handle_start_message
    from orchestrator.lifecycle.inline import inline_lifecycle

    base = "http://vendor.test/api/v2/sessions"
    caplog.set_level(logging.DEBUG)
    lc = inline_lifecycle(
        settings_for(deepbrain_base_url="http://vendor.test", start_timeout_seconds=20)
    )
    try:
        with respx.mock(assert_all_called=False) as vendor:
            vendor.post(f"{base}/token").respond(
                json={"code": 1000, "message": "ok", "data": {"session_token": "t"}}
            )
            start = vendor.post(f"{base}/start").mock(
                side_effect=lambda request: echo(request, status, code)
            )
            outcome = handle_start_message(
                lc,
                (),
                {"request_id": "echoed", "avatar_id": "a", "avatar_persona": ECHO_PERSONA},
                claim_id="t-echo",
            )
    finally:
        lc.close()
    assert outcome.status == "failed" and start.call_count >= 1
    stored = "\n".join(table_dump(db, t) for t in ("sessions", "session_events", "event_outbox"))
    assert "bad persona" in stored  # the vendor's message is kept, masked
    assert "llm.customer.example" in stored  # what is not secret stays readable
    for where, text_ in (("tables", stored), ("logs", caplog.text)):
        found = [name for name, value in ECHO_SECRETS.items() if value in text_]
        assert found == [], where
        assert f"pin {SHORT_SECRET}" not in text_, where
