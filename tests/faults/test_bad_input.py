"""Bad input corpus: malformed start messages published with plain kombu, the way any AMQP
client can. Each one must end as a ``failed`` row with a readable reason, in
``orchestrator.dead``, or (a reused request_id) as a ``duplicate_conflict`` event — never a
crash, never a silent drop — while good messages interleaved with them are all served.

One worker serves the whole corpus (module fixture ``corpus_run``); each case is then its own
test, so a regression shows as one failing case and the rest still prove what they prove.
Messages that used to take the worker down are in test_poison_messages.py (own worker each).
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from orchestrator.config import Settings, load_settings
from orchestrator.db import Database, SessionRow
from orchestrator.simulator import SimulatorServer
from tests.amqp import publish_raw, purge_work_queues, raw_body
from tests.conftest import APP_ID, USER_KEY, WorkerProcess
from tests.faults.conftest import (
    FAULT_ACCOUNTS,
    dead_letter_ids,
    queue_depths,
    rows_by_request,
    second_account_folder,
    take_dead_letters,
    vendor_capacity,
)
from tests.helpers import events

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

MAX_READABLE_REASON = 600


@dataclass(frozen=True)
class Case:
    name: str
    publish: dict[str, Any]
    expect: str  # "failed" (a row with this reason) or "dead" (dead-lettered)
    reason: str = ""  # substring of the failed row's error_message
    request_id: str | None = None  # the row's request_id when the message names a usable one


def kw(**kwargs: Any) -> dict[str, Any]:
    return {"kwargs": kwargs}


def body(raw: bytes, **extra: Any) -> dict[str, Any]:
    return {"body": raw, **extra}


GOOD = {"callbacks": None, "errbacks": None, "chain": None}
DEEP = b'[[], {"avatar_id": "a", "metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}, {}]"
BIG_INT = b'[[], {"avatar_id": "a", "max_session_duration": 1' + b"0" * 5000 + b"}, {}]"

CORPUS: list[Case] = [
    # -- cannot be processed at all: dead-lettered ------------------------------------------
    Case("not-json", body(b'[[], {"avatar_id": '), "dead"),
    Case("invalid-utf8", body(b"\xff\xfe[[], {}, {}] not utf-8"), "dead"),
    Case(
        "pickle",
        body(
            pickle.dumps([[], {"avatar_id": "p"}, {}]),
            content_type="application/x-python-serialize",
        ),
        "dead",
    ),
    Case(
        "pickle-content-type-json-body",
        body(raw_body({"avatar_id": "p"}), content_type="application/x-python-serialize"),
        "dead",
    ),
    Case("text-plain", body(raw_body({"avatar_id": "a"}), content_type="text/plain"), "dead"),
    Case(
        "yaml", body(b"- []\n- {avatar_id: a}\n- {}\n", content_type="application/x-yaml"), "dead"
    ),
    Case(
        "unknown-task", {"kwargs": {"avatar_id": "a"}, "task": "orchestrator.no_such_task"}, "dead"
    ),
    Case("no-task-header", {"kwargs": {"avatar_id": "a"}, "drop_headers": ("task",)}, "dead"),
    Case("nested-10000-deep", body(DEEP), "dead"),
    Case("integer-5000-digits", body(BIG_INT), "dead"),
    Case("bad-eta-header", {"kwargs": {"avatar_id": "a"}, "headers": {"eta": "tomorrow"}}, "dead"),
    Case(
        "bad-expires-header", {"kwargs": {"avatar_id": "a"}, "headers": {"expires": "soon"}}, "dead"
    ),
    Case(
        "bogus-compression",
        {"kwargs": {"avatar_id": "a"}, "headers": {"compression": "application/x-gzip"}},
        "dead",
    ),
    # -- decodes but breaks the contract: a failed row naming the problem ---------------------
    Case(
        "missing-avatar", kw(request_id="bad-missing-avatar"), "failed", "'avatar_id' is required"
    ),
    Case("empty-avatar", kw(request_id="bad-empty-avatar", avatar_id=""), "failed", "'avatar_id'"),
    Case("blank-avatar", kw(request_id="bad-blank-avatar", avatar_id="  "), "failed", "blank"),
    Case("avatar-int", kw(request_id="bad-avatar-int", avatar_id=42), "failed", "'avatar_id'"),
    Case("avatar-null", kw(request_id="bad-avatar-null", avatar_id=None), "failed", "'avatar_id'"),
    Case("avatar-list", kw(request_id="bad-avatar-list", avatar_id=["a"]), "failed", "'avatar_id'"),
    Case(
        "unknown-field",
        kw(request_id="bad-unknown", avatar_id="a", colour="red"),
        "failed",
        "unknown field 'colour'",
    ),
    Case(
        "unknown-fields",
        kw(request_id="bad-unknowns", avatar_id="a", x=1, y=2),
        "failed",
        "unknown field 'x'; unknown field 'y'",
    ),
    Case(
        "duration-negative",
        kw(request_id="bad-dur-neg", avatar_id="a", max_session_duration=-5),
        "failed",
        "'max_session_duration'",
    ),
    Case(
        "duration-zero",
        kw(request_id="bad-dur-zero", avatar_id="a", max_session_duration=0),
        "failed",
        "'max_session_duration'",
    ),
    Case(
        "duration-huge",
        kw(request_id="bad-dur-huge", avatar_id="a", max_session_duration=10**12),
        "failed",
        "at most 60 minutes",
    ),
    Case(
        "duration-string",
        kw(request_id="bad-dur-str", avatar_id="a", max_session_duration="10"),
        "failed",
        "'max_session_duration'",
    ),
    Case(
        "duration-float",
        kw(request_id="bad-dur-float", avatar_id="a", max_session_duration=1.5),
        "failed",
        "'max_session_duration'",
    ),
    Case(
        "duration-bool",
        kw(request_id="bad-dur-bool", avatar_id="a", max_session_duration=True),
        "failed",
        "'max_session_duration'",
    ),
    Case(
        "seconds-negative",
        kw(request_id="bad-sec-neg", avatar_id="a", max_duration_seconds=-1),
        "failed",
        "'max_duration_seconds'",
    ),
    Case(
        "seconds-huge",
        kw(request_id="bad-sec-huge", avatar_id="a", max_duration_seconds=10**30),
        "failed",
        "'max_duration_seconds'",
    ),
    Case(
        "deadline-zero",
        kw(request_id="bad-deadline", avatar_id="a", start_deadline_seconds=0),
        "failed",
        "'start_deadline_seconds'",
    ),
    Case(
        "metadata-1mib",
        kw(request_id="bad-meta-big", avatar_id="a", metadata={"x": "y" * (1 << 20)}),
        "failed",
        "'metadata'",
    ),
    Case(
        "metadata-list",
        kw(request_id="bad-meta-list", avatar_id="a", metadata=[1, 2]),
        "failed",
        "'metadata'",
    ),
    Case(
        "persona-string",
        kw(request_id="bad-persona", avatar_id="a", avatar_persona="friendly"),
        "failed",
        "'avatar_persona'",
    ),
    Case(
        "persona-language-int",
        kw(request_id="bad-lang", avatar_id="a", avatar_persona={"language": 5}),
        "failed",
        "'avatar_persona.language'",
    ),
    Case(
        "persona-temperature-string",
        kw(
            request_id="bad-temp",
            avatar_id="a",
            avatar_persona={"llm_configurations": {"temperature": "hot"}},
        ),
        "failed",
        "temperature",
    ),
    Case(
        "lip-audio-mode-int",
        kw(request_id="bad-lip", avatar_id="a", lip_audio_mode=1),
        "failed",
        "'lip_audio_mode'",
    ),
    Case(
        "greeting-object",
        kw(request_id="bad-greet", avatar_id="a", greeting_text={"t": "hi"}),
        "failed",
        "'greeting_text'",
    ),
    Case(
        "payload-2mib-unknown-field",
        kw(request_id="bad-huge", avatar_id="a", blob="z" * (2 << 20)),
        "failed",
        "unknown field 'blob'",
    ),
    # request_id unusable: the row is keyed by the task id instead, the reason names it.
    Case("request-id-int", kw(request_id=12345, avatar_id="a"), "failed", "'request_id'"),
    Case("request-id-space", kw(request_id="has space", avatar_id="a"), "failed", "'request_id'"),
    Case("request-id-201", kw(request_id="r" * 201, avatar_id="a"), "failed", "'request_id'"),
    Case("request-id-empty", kw(request_id="", avatar_id="a"), "failed", "'request_id'"),
    Case("request-id-list", kw(request_id=["x"], avatar_id="a"), "failed", "'request_id'"),
    Case("request-id-slash", kw(request_id="a/b?c", avatar_id="a"), "failed", "'request_id'"),
    Case(
        "positional-args",
        body(json.dumps([["avatar-a"], {}, GOOD]).encode()),
        "failed",
        "positional arguments",
    ),
    Case(
        "positional-and-keyword",
        body(json.dumps([["x"], {"avatar_id": "a", "request_id": "bad-pos"}, GOOD]).encode()),
        "failed",
        "positional arguments",
        request_id="bad-pos",
    ),
    # -- found by this suite (each was acked and dropped: no row, no dead letter) -------------
    Case("kwargs-list", body(json.dumps([[], ["avatar-a"], GOOD]).encode()), "dead"),
    Case("kwargs-null", body(json.dumps([[], None, GOOD]).encode()), "dead"),
    Case(
        "embed-not-object",
        body(json.dumps([[], {"avatar_id": "a", "request_id": "bad-embed"}, "x"]).encode()),
        "dead",
    ),
    Case(
        "nul-in-avatar-id",
        kw(request_id="bad-nul", avatar_id="a\u0000b"),
        "failed",
        "'avatar_id': contains a NUL character or an unpaired surrogate",
    ),
    Case(
        "nul-in-metadata",
        kw(request_id="bad-nul-meta", avatar_id="a", metadata={"k": "v\u0000"}),
        "failed",
        "'metadata.k': contains a NUL character",
    ),
    Case(
        "lone-surrogate",
        body(b'[[], {"avatar_id": "a\\ud800", "request_id": "bad-surrogate"}, {}]'),
        "failed",
        "'avatar_id': contains a NUL character or an unpaired surrogate",
        request_id="bad-surrogate",
    ),
]


def named_request_id(case: Case) -> str | None:
    """The request_id the row is keyed by when the message names a usable one."""
    if case.request_id is not None:
        return case.request_id
    value = case.publish.get("kwargs", {}).get("request_id")
    return value if isinstance(value, str) and value.startswith("bad-") else None


@dataclass
class CorpusRun:
    task_ids: dict[str, str]
    rows: dict[str, SessionRow]
    dead_ids: set[str]
    good_ids: list[str]
    conflicts: list[dict[str, Any]]
    vendor_sessions: list[dict[str, Any]]
    worker_alive: bool
    worker_log: str
    first_duplicate: SessionRow


def fresh_database(database_url: str) -> Database:
    database = Database(database_url, pool_size=2)
    with database.engine.begin() as conn:
        conn.execute(
            text("TRUNCATE sessions, session_events, event_outbox RESTART IDENTITY CASCADE")
        )
    return database


def wait_rows(db: Database, request_ids: list[str], status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = rows_by_request(db)
        missing = [r for r in request_ids if r not in found or found[r].status != status]
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not {status} after {timeout} s: {missing[:10]}")
        time.sleep(0.2)


def corpus_settings(state_dir: Any, database_url: str, broker_url: str, base_url: str) -> Settings:
    second = None
    if FAULT_ACCOUNTS == 2:
        second = second_account_folder(Path(state_dir) / "accounts", 1000)
    return load_settings(
        accounts_dir=second,
        state_dir=state_dir,
        database_url=database_url,
        broker_url=broker_url,
        deepbrain_base_url=base_url,
        deepbrain_app_id=APP_ID,
        deepbrain_user_key=USER_KEY,
        reaper_interval_seconds=5,
        reconcile_interval_seconds=3600,
        vendor_timeout_seconds=5,
        max_concurrent_sessions=1000,
    )


@pytest.fixture(scope="module")
def corpus_run(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    broker_url: str,
    simulator_server: SimulatorServer,
) -> Iterator[CorpusRun]:
    simulator_server.reset(restore_config=True)
    vendor_capacity(simulator_server, 1000, idle_timeout_seconds=None)
    db = fresh_database(database_url)
    purge_work_queues(broker_url)
    state = tmp_path_factory.mktemp("corpus")
    settings = corpus_settings(state, database_url, broker_url, simulator_server.base_url)
    worker = WorkerProcess(settings, state / "worker.log")
    try:
        # Steady state first (a message arriving while the consumer starts is another story).
        publish_raw(broker_url, {"request_id": "warm-up", "avatar_id": "a"})
        publish_raw(broker_url, {"request_id": "dup-1", "avatar_id": "first-avatar"})
        wait_rows(db, ["warm-up", "dup-1"], "active", 30)
        first_duplicate = rows_by_request(db)["dup-1"]

        task_ids: dict[str, str] = {}
        good_ids: list[str] = []
        for number, case in enumerate(CORPUS):
            task_ids[case.name] = publish_raw(broker_url, **case.publish)
            good_ids.append(f"good-{number:02d}")
            publish_raw(broker_url, {"request_id": good_ids[-1], "avatar_id": f"good-{number}"})
        publish_raw(broker_url, {"request_id": "dup-1", "avatar_id": "second-avatar"})
        good_ids.append("good-last")
        publish_raw(broker_url, {"request_id": "good-last", "avatar_id": "good-last"})

        wait_rows(db, good_ids, "active", 90)
        deadline = time.monotonic() + 10
        while sum(queue_depths(broker_url).values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # dead-lettering of the last messages
        dead = take_dead_letters(broker_url)
        yield CorpusRun(
            task_ids=task_ids,
            rows=rows_by_request(db),
            dead_ids=dead_letter_ids(dead),
            good_ids=good_ids,
            conflicts=events(db, "duplicate_conflict"),
            vendor_sessions=simulator_server.sessions(),
            worker_alive=worker.process.poll() is None,
            worker_log=worker.log(),
            first_duplicate=first_duplicate,
        )
    finally:
        if "Unrecoverable error" in worker.log():
            worker.kill()  # a crashed worker can take long to shut down on its own
        worker.stop()
        db.dispose()


def assert_readable(reason: str | None) -> None:
    assert reason, "a failed row needs an error_message"
    assert "Traceback" not in reason and len(reason) <= MAX_READABLE_REASON, reason


def assert_rejected(run: CorpusRun, case: Case) -> None:
    task_id = run.task_ids[case.name]
    found = run.rows.get(named_request_id(case) or "") or run.rows.get(task_id)
    if case.expect == "dead":
        assert task_id in run.dead_ids, f"{case.name}: not dead-lettered"
        assert found is None, f"{case.name}: dead-lettered and a row"
        return
    assert task_id not in run.dead_ids, f"{case.name}: dead-lettered, a failed row was expected"
    assert found is not None, f"{case.name}: no row and not dead-lettered (silently dropped)"
    assert (found.status, found.error_code) == ("failed", "VALIDATION_ERROR"), case.name
    assert_readable(found.error_message)
    assert case.reason in (found.error_message or ""), (case.name, found.error_message)
    assert found.vendor_session_id is None


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CORPUS])
def test_malformed_message_fails_or_is_dead_lettered(corpus_run: CorpusRun, case: Case) -> None:
    assert_rejected(corpus_run, case)


def test_the_malformed_messages_and_nothing_else_are_dead_lettered_or_failed(
    corpus_run: CorpusRun,
) -> None:
    """The corpus as a whole: the dead-letter queue holds exactly the messages expected there,
    and the failed rows are exactly the ones expected — no good message was dead-lettered or
    failed, no bad one slipped through as something else."""
    run = corpus_run
    dead = {run.task_ids[c.name] for c in CORPUS if c.expect == "dead"}
    failed = {named_request_id(c) or run.task_ids[c.name] for c in CORPUS if c.expect == "failed"}
    assert len(dead) + len(failed) == len(CORPUS) >= 30  # one outcome each, and enough of them
    assert run.dead_ids == dead, (sorted(run.dead_ids - dead), sorted(dead - run.dead_ids))
    failed_rows = {rid for rid, r in run.rows.items() if r.status == "failed"}
    assert failed_rows == failed, (sorted(failed_rows - failed), sorted(failed - failed_rows))


def test_good_messages_between_bad_ones_are_all_served(corpus_run: CorpusRun) -> None:
    run = corpus_run
    assert run.worker_alive, run.worker_log[-3000:]
    for rid in run.good_ids:
        assert run.rows[rid].status == "active" and run.rows[rid].vendor_session_id
    # Only good requests reached the vendor: no bad message made a vendor session.
    avatars = sorted(s["avatar_id"] for s in run.vendor_sessions)
    expected = sorted(
        ["a", "first-avatar", "good-last"] + [f"good-{n}" for n in range(len(CORPUS))]
    )
    assert avatars == expected
    assert "Unrecoverable error" not in run.worker_log


def test_duplicate_request_id_with_other_payload_is_a_recorded_conflict(
    corpus_run: CorpusRun,
) -> None:
    run = corpus_run
    first, now = run.first_duplicate, run.rows["dup-1"]
    assert (now.avatar_id, now.status, now.vendor_session_id, now.request_payload) == (
        first.avatar_id,
        first.status,
        first.vendor_session_id,
        first.request_payload,
    )
    assert now.avatar_id == "first-avatar"
    assert [c["session_id"] for c in run.conflicts] == [first.id]
    assert "second-avatar" not in [s["avatar_id"] for s in run.vendor_sessions]
