"""The hostile vendor: generated replies for token, start, stop, list and detail against the
real client, start path, reconciler and reaper (tests/hostile/driver.py), shrunk by Hypothesis
to the smallest plan that breaks a promise.

In CI the examples are derandomized (the same ones every run) and bounded by
``HOSTILE_EXAMPLES`` (100 per property); ``make chaos`` runs them random and longer
(``HOSTILE_PROFILE=chaos``). A failure prints the shrunk plan, the violations, and a
``@reproduce_failure`` blob that replays it. Violations of the classes issue 22 is fixing are
listed in :data:`KNOWN` (each with its own strict-xfail test in test_hostile_regressions.py)
are reported, not failed on, so that this test keeps searching for new ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.simulator import SimulatorServer
from tests.conftest import APP_ID, USER_KEY
from tests.hostile import strategies
from tests.hostile.driver import PLANTED_LLM_KEY, Outcome, run_scenario
from tests.hostile.known import KNOWN, known_path, signature
from tests.hostile.vendor import Mutation, Reply, Trickle

pytestmark = [pytest.mark.postgres, pytest.mark.chaos]

PROFILE = os.environ.get("HOSTILE_PROFILE", "ci")
# HOSTILE_SHRINK=0: report the first failing plan as found (shrinking may take minutes).
PHASES = (
    tuple(Phase)
    if os.environ.get("HOSTILE_SHRINK", "1") != "0"
    else (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)
)
settings.register_profile(
    "ci",
    phases=PHASES,
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "100")),
    derandomize=True,
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "chaos",
    phases=PHASES,
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "300")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECRETS = (PLANTED_LLM_KEY, APP_ID, USER_KEY)


def hostile_settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for(
        orphan_grace_seconds=0.0,
        reconcile_interval_seconds=1.0,
        reaper_interval_seconds=0.5,
        vendor_timeout_seconds=1.0,
        start_timeout_seconds=10.0,
        stop_retry_seconds=1.0,
        max_concurrent_sessions=10,
    )


_ERRORS: dict[str, type[AssertionError]] = {}


def violated(invariant: str) -> type[AssertionError]:
    """One exception type per invariant, so Hypothesis shrinks each class of failure apart."""
    name = "Violated_" + "".join(c if c.isalnum() else "_" for c in invariant)
    return _ERRORS.setdefault(invariant, type(name, (AssertionError,), {}))


EXAMPLES_RUN = [0]  # examples run in this process: "found at example n" (HOSTILE_SHRINK=0)


def fail_on_new(outcome: Outcome) -> None:
    EXAMPLES_RUN[0] += 1
    note(f"example {EXAMPLES_RUN[0]} of this process")
    served = "\n".join(f"  {endpoint}: {mutation!r}"[:600] for endpoint, mutation in outcome.served)
    note(f"replies served:\n{served or '  (none)'}")
    for violation in outcome.violations:
        path = known_path(violation)
        note(f"{'known, ' + path if path else 'NEW'}: {signature(violation)} — {violation}"[:800])
    new = [v for v in outcome.violations if known_path(v) is None]
    if new:
        raise violated(new[0].invariant)(
            f"{len(new)} new violation(s), first: {signature(new[0])}: {new[0]}"[:2000]
        )


# The whole property runs as one pytest test: its timeout grows with the examples (about 1 s
# each on the 2-core machine, 4 s allowed; the 30-minute `make chaos` run of 2026-12-06 hit
# the suite's 300 s at example 271 of 300 under load 13).
EXAMPLES_TIMEOUT = max(300, 4 * settings.get_profile(PROFILE).max_examples)


@pytest.mark.timeout(EXAMPLES_TIMEOUT)
@settings(settings.get_profile(PROFILE))
@given(plan=strategies.plans())
def test_a_hostile_vendor_breaks_no_promise(
    plan: dict[str, list[strategies.Mutation]],
    settings_for: Callable[..., Settings],
    db: Database,
    simulator: SimulatorServer,
) -> None:
    outcome = run_scenario(hostile_settings(settings_for), db, simulator, plan, SECRETS)
    fail_on_new(outcome)


@pytest.mark.timeout(EXAMPLES_TIMEOUT)
@settings(settings.get_profile(PROFILE))
@given(plan=strategies.plans(size=1), lasting=strategies.lasting_quirks())
def test_a_vendor_with_lasting_quirks_breaks_no_promise(
    plan: dict[str, list[strategies.Mutation]],
    lasting: dict[str, strategies.Mutation],
    settings_for: Callable[..., Settings],
    db: Database,
    simulator: SimulatorServer,
) -> None:
    """Quirks that stay after the heal (junk rows in the list, unknown fields): the service
    must keep its promises with them for good."""
    outcome = run_scenario(hostile_settings(settings_for), db, simulator, plan, SECRETS, lasting)
    note(f"lasting quirks: {lasting!r}"[:1000])
    fail_on_new(outcome)


def test_an_honest_vendor_breaks_no_promise(
    settings_for: Callable[..., Settings], db: Database, simulator: SimulatorServer
) -> None:
    """The scenario itself keeps every promise with nothing changed (else every finding of
    the generator would be the scenario's own)."""
    outcome = run_scenario(hostile_settings(settings_for), db, simulator, {}, SECRETS)
    assert outcome.violations == []


TRICKLES = [
    # 4 bytes every 0.1 s: a start reply of ~600 bytes would take 15 s; the vendor made the
    # session, the client gave up at its deadline (uncertain) and tried again.
    pytest.param({"start": [Trickle(4, 0.1)]}, id="start-trickled-past-the-timeout"),
    pytest.param({"start": [Trickle(8, 0.02, reset_after=40)]}, id="start-reset-mid-body"),
    # The token is cached: a 401 makes the start fetch a new one, trickled.
    pytest.param(
        {"start": [Reply(401, {"code": 4010, "message": "expired", "data": None})]}
        | {"token": [Trickle(1, 0.3)]},
        id="token-trickled-after-a-401",
    ),
    pytest.param({"list": [Trickle(2, 0.1)]}, id="list-trickled"),
    pytest.param({"stop": [Trickle(1, 0.6)] * 2}, id="stop-trickled-twice"),
    pytest.param({"detail": [Trickle(1, 0.3, reset_after=10)]}, id="detail-reset-mid-body"),
]


@pytest.mark.parametrize("plan", TRICKLES)
def test_a_trickling_vendor_keeps_every_time_bound(
    plan: dict[str, list[Mutation]],
    settings_for: Callable[..., Settings],
    db: Database,
    simulator: SimulatorServer,
) -> None:
    """A reply whose every read is quick but whose whole takes far longer than
    ``VENDOR_TIMEOUT_SECONDS``, sent by the simulator over the real socket: the client's own
    total deadline (orchestrator/deepbrain/deadline.py) ends each request in time, the start
    keeps its lease, and the session a trickled start made does not stay billing."""
    settings = hostile_settings(settings_for)
    outcome = run_scenario(settings, db, simulator, plan, SECRETS)
    assert outcome.violations == [], [str(v) for v in outcome.violations]
    endpoint, trickles = next(
        (name, [m for m in ms if isinstance(m, Trickle)])
        for name, ms in plan.items()
        if any(isinstance(m, Trickle) for m in ms)
    )
    served = [m for name, m in outcome.served if name == endpoint]
    assert served, f"no {endpoint} request came while the plan was in force"
    assert simulator.stats()["endpoints"][endpoint]["faults_applied"] == len(served)
    slowest = max(took for name, took in outcome.timings if name == endpoint)
    if all(m.reset_after is None for m in trickles):
        # The trickle outlasted the timeout: the deadline, not the reply's end, ended it.
        assert slowest >= settings.vendor_timeout_seconds * 0.9, outcome.timings


def test_known_classes_name_their_path() -> None:
    assert all(path.startswith("issue ") for path in KNOWN.values())


@given(st.data())
@settings(max_examples=30, derandomize=True, database=None)
def test_generated_replies_are_valid_json_or_bytes(data: st.DataObject) -> None:
    """Every generated plan can be served (a strategy bug is not a finding)."""
    plan = data.draw(strategies.plans())
    for mutations in plan.values():
        assert mutations
