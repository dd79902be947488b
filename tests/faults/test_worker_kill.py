"""SIGKILL the worker that runs starts — before, during and after the vendor call — and
restart it, many times. Afterwards every request is active/ended/failed with a reason, has one
row and at most one recorded vendor session, and no vendor session runs without a live row
for longer than the orphan grace plus one reconcile interval.

The vendor has no idempotency key: a kill in the middle of the vendor call leaves a vendor
session no row knows (the redelivered message starts another one). The test counts those
duplicates and proves the reconciler stops every one of them in time.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess, wait_until
from tests.faults.conftest import (
    ORPHAN_BOUND_SECONDS,
    RECONCILE_INTERVAL_SECONDS,
    all_rows,
    assert_live_vendor_sessions_have_live_rows,
    assert_rows_are_final_and_explained,
    event_counts,
    rows_by_request,
    wait_no_unowned_vendor_sessions,
    wait_settled,
)

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

KILL_ROUNDS = 4  # SIGKILLs of the start worker (each followed by a restart)
STARTS_PER_ROUND = 6
VENDOR_START_LATENCY = 0.6  # long enough for a kill to land inside the vendor call
START_TIMEOUT_SECONDS = 8.0
TRIGGERS = ("before the vendor call", "during the vendor call", "after a vendor answer")


def phase_of(row: Any) -> str:
    """Where a request was when the worker died."""
    if row is None:
        return "not picked up"
    if row.status == "starting" and row.attempts == 0:
        return "claimed, before the vendor call"
    if row.status == "starting":
        return "inside the vendor call (or answered, not recorded)"
    return "recorded"


def test_sigkill_during_starts_loses_nothing_and_leaves_nothing_billing(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
    clean_queues: None,
) -> None:
    sim = big_vendor
    sim.configure(endpoint_latency=f"start={VENDOR_START_LATENCY}")
    common = {"start_timeout_seconds": START_TIMEOUT_SECONDS}
    # Reaper, reconciler and admission run in a worker that is not killed; starts in the victim.
    start_worker(
        fault_settings("steady", **common),
        "--queues", "orchestrator.control", "--beat", "--hostname", "steady@%h",
    )  # fmt: skip
    victim_settings = fault_settings("victim", **common)
    victim_args = ("--queues", "orchestrator.start", "--hostname", "victim@%h")
    victim = start_worker(victim_settings, *victim_args)
    producer = Producer(victim_settings)
    rng = random.Random(7)
    request_ids: list[str] = []
    phases: Counter[str] = Counter()
    downtime: list[float] = []
    try:
        for round_no in range(KILL_ROUNDS):
            batch = [f"k{round_no}-{i}" for i in range(STARTS_PER_ROUND)]
            for i, rid in enumerate(batch):
                # Half end by the reaper soon, half stay active: both paths after a crash.
                extra = {"max_duration_seconds": 3} if i % 2 else {}
                producer.enqueue_start_session(request_id=rid, avatar_id=rid, **extra)
                request_ids.append(rid)
                time.sleep(rng.uniform(0, 0.1))
            trigger = TRIGGERS[round_no % len(TRIGGERS)]
            if trigger == TRIGGERS[1]:
                wait_until(
                    lambda batch=batch: any(
                        r.status == "starting" and r.attempts > 0
                        for r in rows_by_request(db, batch).values()
                    ),
                    timeout=10,
                    interval=0.05,
                    what="a start inside the vendor call",
                )
                time.sleep(rng.uniform(0, VENDOR_START_LATENCY / 2))
            elif trigger == TRIGGERS[2]:
                wait_until(
                    lambda batch=batch: any(
                        r.status == "active" for r in rows_by_request(db, batch).values()
                    ),
                    timeout=10,
                    interval=0.05,
                    what="a recorded start",
                )
            victim.kill()
            killed_at = time.monotonic()
            # Every request not settled yet is "in flight" for this kill, not only this batch.
            found = rows_by_request(db, request_ids)
            phases.update(
                phase_of(found.get(rid))
                for rid in request_ids
                if rid not in found or found[rid].status in ("waiting", "starting")
            )
            if round_no == KILL_ROUNDS - 1:
                # Stay down past the start timeout: the reconciler must resolve what is stuck.
                time.sleep(START_TIMEOUT_SECONDS + RECONCILE_INTERVAL_SECONDS + 1)
            victim = start_worker(victim_settings, *victim_args)
            downtime.append(time.monotonic() - killed_at)

        final = wait_settled(db, request_ids, timeout=45)
        audit = wait_no_unowned_vendor_sessions(db, sim)
    finally:
        producer.close()

    assert_rows_are_final_and_explained(final, request_ids)
    every_row = sorted(r.request_id for r in all_rows(db))  # the whole table, unfiltered
    assert every_row == sorted(request_ids), "one row per request, and no other"
    events = event_counts(db, ("active", "ended", "failed"))
    for rid in request_ids:
        assert events.get((rid, "active"), 0) <= 1, rid
        assert events.get((rid, "ended"), 0) + events.get((rid, "failed"), 0) <= 1, rid

    by_avatar: dict[str, list[dict[str, Any]]] = {}
    for s in sim.sessions():
        by_avatar.setdefault(s["avatar_id"], []).append(s)
    recorded = {r.vendor_session_id for r in final.values() if r.vendor_session_id}
    for rid in request_ids:
        vendor_id = final[rid].vendor_session_id
        if vendor_id is not None:  # the recorded session is one this request made
            assert vendor_id in {s["session_id"] for s in by_avatar[rid]}, rid
    duplicates = {
        rid: [s for s in by_avatar.get(rid, []) if s["session_id"] not in recorded]
        for rid in request_ids
    }
    duplicates = {rid: extra for rid, extra in duplicates.items() if extra}
    for extra in duplicates.values():
        for s in extra:
            assert s["status"] == "ended", s
            assert s["end_reason"] in ("ZOMBIE_SESSION_REAP", "ERROR"), s
    assert audit.longest_unowned_life() <= ORPHAN_BOUND_SECONDS, audit.unowned
    assert_live_vendor_sessions_have_live_rows(db, sim)

    extra_sessions = sum(len(v) for v in duplicates.values())
    statuses = Counter(r.status for r in final.values())
    errors = Counter(r.error_code for r in final.values() if r.error_code)
    print(
        f"\nworker kill: {KILL_ROUNDS} SIGKILLs, {len(request_ids)} starts; at the kill: "
        f"{dict(phases)}; final {dict(statuses)} {dict(errors)}; "
        f"duplicate vendor sessions: {extra_sessions} (for {len(duplicates)} requests), "
        f"all stopped; longest unrecorded life {audit.longest_unowned_life():.1f} s "
        f"(bound {ORPHAN_BOUND_SECONDS:.0f} s); worker down for {[round(d, 1) for d in downtime]} s"
    )
    # The kill inside the vendor call must have produced (and the reconciler stopped) at least
    # one duplicate: otherwise this test proved nothing about them.
    assert phases["inside the vendor call (or answered, not recorded)"] > 0
    assert extra_sessions > 0
