"""The shrunk replies the hostile vendor found, each replayed as its own test (named after
the case). Those in issue 22's paths are strict xfails: when the fix lands the test passes,
strict xfail fails the run, and the fixer removes the mark (and the class from known.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.simulator import SimulatorServer
from tests.hostile.driver import run_scenario
from tests.hostile.test_hostile_vendor import SECRETS, hostile_settings
from tests.hostile.vendor import Mutation, Reply, SetField

pytestmark = [pytest.mark.postgres, pytest.mark.chaos]

MS_EXP_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3NjQ2MDAwMDAwMDB9.c2ln"  # exp 1764600000000


def issue22(path: int, what: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"issue 22 path {path}: {what}")


CASES = [
    # Found by the generator, outside issue 22, fixed: a yes without LiveKit credentials was
    # recorded `active` (a billing session nobody can join).
    pytest.param({"start": [SetField(("livekit", "token"), "")]}, id="start-livekit-token-empty"),
    pytest.param({"start": [SetField(("livekit", "url"), "")]}, id="start-livekit-url-empty"),
    pytest.param(
        {"start": [Reply(400, None, echo=True)]},
        marks=issue22(2, "the vendor's error echoes the request: the LLM key is stored"),
        id="start-400-echoing-the-request",
    ),
    pytest.param(
        {"list": [SetField(("created_at",), 1_764_600_000_000, in_rows=True)]},
        marks=issue22(1, "a millisecond epoch in the list ends the reconcile pass"),
        id="list-created_at-ms-epoch",
    ),
    pytest.param(
        {"detail": [SetField(("created_at",), 253402394816.0)]},
        marks=issue22(1, "a detail timestamp past year 9999 ends the reconcile pass"),
        id="detail-created_at-year-10000",
    ),
    pytest.param(
        {"start": [SetField(("session_id",), "\x00")]},
        marks=issue22(1, "a session id Postgres cannot store crashes the start after the yes"),
        id="start-session_id-nul",
    ),
    pytest.param(
        {"start": [SetField(("livekit", "token"), MS_EXP_JWT)]},
        marks=issue22(1, "a LiveKit token whose exp is in ms crashes the start after the yes"),
        id="start-livekit-token-exp-ms",
    ),
    pytest.param(
        {"start": [Reply(233, {"code": -(10**60), "message": "x", "data": None}, forward=True)]},
        marks=issue22(1, "a 61-digit vendor code makes an error_code longer than its column"),
        id="start-code-61-digits",
    ),
    pytest.param(
        {"stop": [Reply(400, {"code": 4000, "message": "\x00", "data": None})] * 2},
        # the first is the reconciler's stop of the orphan, the second the reaper's of C
        marks=issue22(1, "a stop error's message with NUL ends the reaper's sweep"),
        id="stop-400-message-nul",
    ),
    pytest.param(
        {"start": [Reply(400, {"code": 4000, "message": "\ud800", "data": None})]},
        marks=issue22(1, "a vendor message with a lone surrogate fails the write of the failure"),
        id="start-400-message-lone-surrogate",
    ),
    pytest.param(
        {"start": [SetField(("max_session_numbers",), -1)]},
        marks=issue22(1, "max_session_numbers -1 is kept: every later admission fails"),
        id="start-max_session_numbers-minus-1",
    ),
    pytest.param(
        {"start": [SetField(("max_session_duration",), 20)]},
        marks=issue22(3, "asked 1 minute, granted 20: the session runs 20"),
        id="start-granted-20-minutes-for-1-asked",
    ),
]


@pytest.mark.parametrize("plan", CASES)
def test_shrunk_hostile_reply_breaks_no_promise(
    plan: dict[str, list[Mutation]],
    settings_for: Callable[..., Settings],
    db: Database,
    simulator: SimulatorServer,
) -> None:
    outcome = run_scenario(hostile_settings(settings_for), db, simulator, plan, SECRETS)
    assert outcome.violations == [], [str(v) for v in outcome.violations]
