"""PT tenants: the admission of a freed slot with 10,000 requests of 1,000 tenants waiting,
against the same backlog of one tenant.

In process, no vendor and no worker: one account of cap 100, full (100 live, claimed with
``store.admission.claim``), and 10,000 waiting rows (inserted in one statement, counted by the
triggers as any insert; 10 per tenant, oldest first in turn). 1,000 tenants: 50 with a
guarantee of 1 slot, 100 with a maximum of 3, weights 0.5-3 (seeded), the rest unconfigured.
Then, ``DECISIONS`` times: one live session ends (``store.ending.end``) and ``store.admit``
gives the freed slot to a waiting request (the timed **admission decision**: the account's
lock, the tenants' order, the row to ``starting``). Reported: the decision's p50/p99,
**admissions/s** (end + admit, one thread, back to back: no vendor call, so not starts/s),
and the grouping of the waiting requests by tenant (``tenant_order.backlog``) alone, the part
of the decision that reads the backlog. Each beside the one-tenant figure of the same
repetition (order alternating).

``--quick``: 100 decisions instead of 300.
"""

from __future__ import annotations

import random
import time
from typing import Any

from sqlalchemy import text

from benchmarks.common import claim_request
from benchmarks.harness import BenchContext, log
from benchmarks.stats import ratio, summary_ms
from orchestrator.db import Database
from orchestrator.store.accounts import CatalogEntry, sync_catalog
from orchestrator.store.admission import claim
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from orchestrator.store.tenant_order import backlog
from orchestrator.store.tenants import set_policy
from orchestrator.store.waiting import admit
from orchestrator.tenants import TenantPolicy

NAME = "PT"
TITLE = "Tenants: a freed slot's admission with 10,000 waiting requests of 1,000 tenants"
ACCOUNT = "solo"
CAP = 100
WAITING = 10_000
TENANTS = 1_000
DECISIONS = 300
GROUPINGS = 50  # timed calls of the grouping alone

_WAITING_ROWS = text(
    "INSERT INTO sessions (id, request_id, claim_id, status, avatar_id, request_payload,"
    " payload_sha256, created_at, tenant, account, attempts, stop_attempts)"
    " SELECT gen_random_uuid(), 'pt-w-' || i, 'pt-c-' || i, 'waiting', 'bench', '{}', 'x',"
    " now() - make_interval(secs => (:n - i) * 0.01), 't' || (i % :tenants), NULL, 0, 0"
    " FROM generate_series(0, :n - 1) AS i"
)


def _prepare(db: Database, tenants: int) -> None:
    sync_catalog(db, [CatalogEntry(ACCOUNT, CAP, 1.0, {})])
    rng = random.Random(9)
    if tenants > 1:
        for i in range(150):
            set_policy(
                db,
                TenantPolicy(
                    name=f"t{i}",
                    guaranteed=1 if i < 50 else 0,
                    maximum=None if i < 50 else 3,
                    weight=rng.choice([0.5, 1.0, 2.0, 3.0]),
                ),
            )
    for i in range(CAP):  # the pool full, before anyone waits
        found = claim(
            db, claim_request(f"pt-l-{i}", tenant=f"t{(i * 7) % tenants}"), lease_seconds=3600
        )
        if found.status != "starting":
            raise RuntimeError(f"live claim {i}: {found.status}")
    with db.transaction() as session:
        session.execute(_WAITING_ROWS, {"n": WAITING, "tenants": tenants})
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE sessions"))
        conn.execute(text("ANALYZE tenant_account_usage"))


def _measure(ctx: BenchContext, tenants: int, decisions: int) -> dict[str, Any]:
    db = Database(ctx.database(f"pt{tenants}"), pool_size=2)
    try:
        _prepare(db, tenants)
        rng = random.Random(tenants)
        took: list[float] = []
        began = time.perf_counter()
        for i in range(decisions):
            with db.transaction() as session:
                live = session.execute(
                    text(
                        "SELECT id FROM sessions WHERE status = 'starting'"
                        " ORDER BY id OFFSET :k LIMIT 1"
                    ),
                    {"k": rng.randrange(CAP)},
                ).scalar_one()
                end(session, [live], S.ENDED, from_statuses=[S.STARTING])
            started = time.perf_counter()
            admitted = admit(db, account=ACCOUNT)
            took.append(time.perf_counter() - started)
            if len(admitted) != 1:
                raise RuntimeError(f"decision {i}: {len(admitted)} admitted, not 1")
        elapsed = time.perf_counter() - began
        grouping: list[float] = []
        for _ in range(GROUPINGS):
            with db.transaction() as session:
                started = time.perf_counter()
                groups = backlog(session, ACCOUNT, {})
                grouping.append(time.perf_counter() - started)
        return {
            "tenants": tenants,
            "waiting": WAITING,
            "decision": summary_ms(took),
            "admissions_per_s": round(decisions / elapsed, 1),
            "grouping": summary_ms(grouping),
            "groups": len(groups),
        }
    finally:
        db.dispose()


def run(ctx: BenchContext) -> dict[str, Any]:
    decisions = 100 if ctx.quick else DECISIONS
    measured: dict[str, dict[str, Any]] = {}
    order = (1, TENANTS) if ctx.repetition % 2 else (TENANTS, 1)
    for tenants in order:
        log(f"PT: {tenants} tenant(s), {WAITING} waiting: {decisions} freed slots admitted")
        measured["one" if tenants == 1 else "many"] = _measure(ctx, tenants, decisions)
    one, many = measured["one"], measured["many"]

    def figure(name: str, unit: str, value: float, base: float, detail: str) -> dict[str, Any]:
        return {
            "name": name,
            "value": value,
            "unit": unit,
            "baseline": base,
            "baseline_name": "one tenant, the same 10,000 waiting",
            "ratio": ratio(value, base),
            "detail": detail,
        }

    detail = f"cap {CAP}, full; one freed slot → admit; {decisions} decisions"
    return {
        "tenants": measured,
        "figures": [
            figure(
                "admission decision p50, 1,000 tenants",
                "ms",
                many["decision"]["p50_ms"],
                one["decision"]["p50_ms"],
                detail,
            ),
            figure(
                "admission decision p99, 1,000 tenants",
                "ms",
                many["decision"]["p99_ms"],
                one["decision"]["p99_ms"],
                detail,
            ),
            figure(
                "admissions/s (end + admit, one thread), 1,000 tenants",
                "/s",
                many["admissions_per_s"],
                one["admissions_per_s"],
                "in process, no vendor call: admissions, not starts",
            ),
            figure(
                "grouping of the waiting requests by tenant p50, 1,000 tenants",
                "ms",
                many["grouping"]["p50_ms"],
                one["grouping"]["p50_ms"],
                f"tenant_order.backlog alone: {many['groups']} groups (one tenant: none, it"
                " is skipped when at most one tenant waits)",
            ),
        ],
    }
