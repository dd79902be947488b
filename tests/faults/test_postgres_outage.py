"""Postgres goes away under a stream of starts — through a TCP proxy between the worker and
the server, so the Postgres the rest of the suite uses keeps running — and comes back.

No request is lost, none gets a second row, every one is served in the end, no vendor session
runs without a row (a start the vendor confirmed while the database was away is stopped at
once: compensation), and the worker reconnects on its own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.lifecycle import RetryLater, handle_start_message
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess, wait_until
from tests.faults.conftest import (
    ORPHAN_BOUND_SECONDS,
    TERMINAL,
    assert_live_vendor_sessions_have_live_rows,
    assert_rows_are_final_and_explained,
    event_counts,
    rows_by_request,
    via_proxy,
    wait_no_unowned_vendor_sessions,
    wait_settled,
)
from tests.faults.tcp_proxy import TcpProxy
from tests.helpers import events, row
from tests.threads import in_background

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

STREAM_STARTS = 40
STREAM_GAP_SECONDS = 0.1
OUTAGE_AFTER_SECONDS = 0.8
OUTAGE_SECONDS = 3.0
SHORT_MAX_DURATION = 4


def test_database_outage_during_a_stream_of_starts(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    database_url: str,
    db: Database,
    big_vendor: SimulatorServer,
    pg_proxy: TcpProxy,
    clean_queues: None,
) -> None:
    sim = big_vendor
    sim.configure(endpoint_latency="start=0.4")
    settings = fault_settings(database_url=via_proxy(database_url, pg_proxy))
    worker = start_worker(settings, "--beat")
    producer = Producer(settings)
    request_ids = [f"pg-{i:02d}" for i in range(STREAM_STARTS)]
    # Two in three get a short max duration: the reaper must end them across the outage too.
    short_lived = [rid for i, rid in enumerate(request_ids) if i % 3]

    def stream() -> None:
        for rid in request_ids:
            extra = {"max_duration_seconds": SHORT_MAX_DURATION} if rid in short_lived else {}
            producer.enqueue_start_session(request_id=rid, avatar_id=rid, **extra)
            time.sleep(STREAM_GAP_SECONDS)

    try:
        enqueuer = in_background(stream)
        time.sleep(OUTAGE_AFTER_SECONDS)
        # A worker slow to start (a loaded machine) has no connection to cut yet.
        wait_until(lambda: pg_proxy.open_connections, what="the worker's database connections")
        cut = pg_proxy.cut()  # open connections reset, new ones refused
        time.sleep(OUTAGE_SECONDS)
        pg_proxy.restore()
        time.sleep(0.5)
        dropped_again = pg_proxy.drop_connections()  # a second, short blip (failover-like)
        enqueuer.result(timeout=60)

        settled = wait_settled(db, request_ids, timeout=60)
        failed = {
            rid: (r.error_code, r.error_message)
            for rid, r in settled.items()
            if r.status == "failed"
        }
        wait_settled(db, short_lived, timeout=SHORT_MAX_DURATION + 20, allowed=TERMINAL)
        final = rows_by_request(db, request_ids)
        audit = wait_no_unowned_vendor_sessions(db, sim)
        # Reconnected on its own: a request made now is served like any other.
        producer.enqueue_start_session(request_id="after-outage", avatar_id="after-outage")
        after = wait_settled(db, ["after-outage"], timeout=20)["after-outage"]
    finally:
        producer.close()

    assert cut > 0, "the outage must have cut live database connections"
    assert worker.process.poll() is None, worker.log()[-3000:]
    assert after.status == "active"
    # Every request is served: none failed, each became active exactly once, and then ended
    # only by its own max duration (docs/reliability.md: every request ends `active`).
    assert not failed, f"requests failed during the outage: {failed}"
    assert_rows_are_final_and_explained(final, request_ids)
    counts = event_counts(db, ("active", "ended", "failed"))
    log = worker.log()
    lines = [line for line in log.splitlines() if "stopped vendor session of request" in line]
    # The one documented exception (docs/reliability.md row 44): a record whose commit landed
    # but whose reply the cut lost, the row unreadable until the record window closed (zero
    # here: the orphan grace equals the vendor timeout), has its session stopped at once and
    # its row ended ERROR by the retry. Each such row is one the worker compensated.
    lost_replies = set()
    for rid in request_ids:
        assert counts.get((rid, "active"), 0) == 1, rid
        assert counts.get((rid, "ended"), 0) + counts.get((rid, "failed"), 0) <= 1, rid
        r = final[rid]
        if (r.status, r.end_reason) == ("ended", "ERROR"):
            assert any(f"request {rid} again" in line for line in lines), (rid, lines)
            stopped = audit.owned[str(r.vendor_session_id)]  # by the worker, at once
            assert (stopped["end_reason"], stopped["ended_by"]) == ("ERROR", "stop"), stopped
            lost_replies.add(rid)
            continue
        expected = ("ended", "MAX_DURATION_REACHED") if rid in short_lived else ("active", None)
        assert (r.status, r.end_reason) == expected, rid
    # Every vendor session no row records was stopped by compensation (the worker, reason
    # ERROR), none was left to the reconciler (ZOMBIE_SESSION_REAP).
    compensated = len(lines)
    for s in audit.unowned:
        assert (s["status"], s["end_reason"], s["ended_by"]) == ("ended", "ERROR", "stop"), s
    assert compensated == len(audit.unowned) + len(lost_replies), (lines, audit.unowned)
    assert audit.longest_unowned_life() <= ORPHAN_BOUND_SECONDS, audit.unowned
    assert_live_vendor_sessions_have_live_rows(db, sim)
    assert "database unavailable" in log, "the outage must have hit at least one start"

    recorded = len(events(db, "compensated"))
    orphans = len(events(db, "orphan_stopped"))
    print(
        f"\npostgres outage: {cut} + {dropped_again} connections cut; final "
        f"{dict(Counter(r.status for r in final.values()))}; {log.count('database unavailable')} "
        f"task retries; {len(audit.unowned)} unrecorded vendor sessions ({compensated} "
        f"compensated at once, {recorded} of them recorded; {orphans} stopped by the reconciler;"
        f" {len(lost_replies)} lost commit replies)"
    )


def test_vendor_yes_with_the_database_gone_is_stopped_before_the_error_escapes(
    settings_for: Callable[..., Settings],
    database_url: str,
    db: Database,
    simulator: SimulatorServer,
    pg_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Compensation alone, in process: no worker, so no beat and no reconciler that could stop
    the session instead. The vendor says yes while the database is cut; the write of that
    answer fails (and keeps failing past the few seconds it is retried), and the vendor
    session is already stopped (``ERROR``) when the caller is told to run the message again
    (``RetryLater``: a worker's task publishes it again)."""
    caplog.set_level(logging.WARNING, logger="orchestrator")
    simulator.configure(endpoint_latency="start=1.0")
    lc = inline_lifecycle(settings_for(database_url=via_proxy(database_url, pg_proxy)))
    try:
        outcome = in_background(
            lambda: handle_start_message(
                lc, (), {"request_id": "comp", "avatar_id": "a"}, claim_id="t-comp"
            )
        )
        wait_until(
            lambda: simulator.stats()["endpoints"]["start"]["in_flight"] == 1,
            timeout=10,
            interval=0.01,
            what="the vendor start in flight",
        )
        assert pg_proxy.cut() > 0  # while the vendor is still answering
        with pytest.raises(RetryLater):
            outcome.result(timeout=30)
        (vendor,) = simulator.sessions()
        assert (vendor["status"], vendor["end_reason"], vendor["ended_by"]) == (
            "ended",
            "ERROR",
            "stop",
        )
        assert vendor["stop_calls"] == 1
        assert "stopped vendor session of request comp again: database write failed" in (
            caplog.text
        )
        r = row(db, "comp")  # read past the proxy: the row never learnt of that session
        assert (r.status, r.vendor_session_id) == ("starting", None)
    finally:
        pg_proxy.restore()
        lc.close()
