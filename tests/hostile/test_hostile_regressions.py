"""The shrunk replies the hostile vendor found, each replayed as its own test (named after
the case). Those of issue 22's paths were strict xfails until issue 22 was merged; they pass
now, and stay as regression tests.
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


CASES = [
    # Found by the generator, outside issue 22, fixed: a yes without LiveKit credentials was
    # recorded `active` (a billing session nobody can join).
    pytest.param({"start": [SetField(("livekit", "token"), "")]}, id="start-livekit-token-empty"),
    pytest.param({"start": [SetField(("livekit", "url"), "")]}, id="start-livekit-url-empty"),
    # Found after merging issue 22 (example 619 of a random run): a room name of NUL only is
    # non-empty until its NULs are removed for storage.
    pytest.param(
        {"start": [SetField(("livekit", "room_name"), "\x00" * 16)]},
        id="start-livekit-room_name-only-nul",
    ),
    pytest.param(
        {"start": [Reply(400, None, echo=True)]},
        id="start-400-echoing-the-request",
    ),
    pytest.param(
        {"list": [SetField(("created_at",), 1_764_600_000_000, in_rows=True)]},
        id="list-created_at-ms-epoch",
    ),
    pytest.param(
        {"detail": [SetField(("created_at",), 253402394816.0)]},
        id="detail-created_at-year-10000",
    ),
    pytest.param(
        {"start": [SetField(("session_id",), "\x00")]},
        id="start-session_id-nul",
    ),
    pytest.param(
        {"start": [SetField(("livekit", "token"), MS_EXP_JWT)]},
        id="start-livekit-token-exp-ms",
    ),
    pytest.param(
        {"start": [Reply(233, {"code": -(10**60), "message": "x", "data": None}, forward=True)]},
        id="start-code-61-digits",
    ),
    pytest.param(
        {"stop": [Reply(400, {"code": 4000, "message": "\x00", "data": None})] * 2},
        # the first is the reconciler's stop of the orphan, the second the reaper's of C
        id="stop-400-message-nul",
    ),
    pytest.param(
        {"start": [Reply(400, {"code": 4000, "message": "\ud800", "data": None})]},
        id="start-400-message-lone-surrogate",
    ),
    pytest.param(
        {"start": [SetField(("max_session_numbers",), -1)]},
        id="start-max_session_numbers-minus-1",
    ),
    pytest.param(
        {"start": [SetField(("max_session_duration",), 20)]},
        id="start-granted-20-minutes-for-1-asked",
    ),
    # Found by the lasting-quirks property (CI form, example 318) once trickles joined the
    # strategies: the stop of the unusable reply's session could not encode the id (httpx's
    # JSON is UTF-8): UnicodeEncodeError escaped the start, the session was left billing.
    pytest.param(
        {"start": [SetField(("session_id",), "\ud800" * 65)]},
        id="start-session_id-lone-surrogates",
    ),
    pytest.param(
        {"start": [SetField(("session_id",), "ok-\udfff")]},
        id="start-session_id-a-lone-surrogate",
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
