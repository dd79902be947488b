"""Postgres goes away under a stream of starts — through a TCP proxy between the worker and
the server, so the Postgres the rest of the suite uses keeps running — and comes back.

No request is lost, none gets a second row, no vendor session runs without a row (a start the
vendor confirmed while the database was away is stopped at once — compensation — or by the
reconciler), and the worker reconnects on its own.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess
from tests.faults.conftest import (
    ORPHAN_BOUND_SECONDS,
    assert_live_vendor_sessions_have_live_rows,
    assert_rows_are_final_and_explained,
    event_counts,
    via_proxy,
    wait_no_unowned_vendor_sessions,
    wait_settled,
)
from tests.faults.tcp_proxy import TcpProxy
from tests.helpers import events

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

STREAM_STARTS = 40
STREAM_GAP_SECONDS = 0.1
OUTAGE_AFTER_SECONDS = 0.8
OUTAGE_SECONDS = 3.0


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

    def stream() -> None:
        for i, rid in enumerate(request_ids):
            producer.enqueue_start_session(
                request_id=rid, avatar_id=rid, **({"max_duration_seconds": 4} if i % 3 else {})
            )
            time.sleep(STREAM_GAP_SECONDS)

    try:
        enqueuer = threading.Thread(target=stream)
        enqueuer.start()
        time.sleep(OUTAGE_AFTER_SECONDS)
        cut = pg_proxy.cut()  # open connections reset, new ones refused
        time.sleep(OUTAGE_SECONDS)
        pg_proxy.restore()
        time.sleep(0.5)
        dropped_again = pg_proxy.drop_connections()  # a second, short blip (failover-like)
        enqueuer.join()

        final = wait_settled(db, request_ids, timeout=60)
        audit = wait_no_unowned_vendor_sessions(db, sim)
        # Reconnected on its own: a request made now is served like any other.
        producer.enqueue_start_session(request_id="after-outage", avatar_id="after-outage")
        after = wait_settled(db, ["after-outage"], timeout=20)["after-outage"]
    finally:
        producer.close()

    assert cut > 0, "the outage must have cut live database connections"
    assert worker.process.poll() is None, worker.log()[-3000:]
    assert after.status == "active"
    assert_rows_are_final_and_explained(final, request_ids)
    counts = event_counts(db, ("active", "ended", "failed"))
    for rid in request_ids:
        assert counts.get((rid, "active"), 0) <= 1, rid
        assert counts.get((rid, "ended"), 0) + counts.get((rid, "failed"), 0) <= 1, rid
    for s in audit.unowned:
        assert s["status"] == "ended" and s["end_reason"] in ("ERROR", "ZOMBIE_SESSION_REAP"), s
    assert audit.longest_unowned_life() <= ORPHAN_BOUND_SECONDS, audit.unowned
    assert_live_vendor_sessions_have_live_rows(db, sim)
    log = worker.log()
    assert "database unavailable" in log, "the outage must have hit at least one start"

    compensated = log.count("stopped vendor session of request")
    recorded = len(events(db, "compensated"))
    orphans = len(events(db, "orphan_stopped"))
    print(
        f"\npostgres outage: {cut} + {dropped_again} connections cut; final "
        f"{dict(Counter(r.status for r in final.values()))}; {log.count('database unavailable')} "
        f"task retries; {len(audit.unowned)} unrecorded vendor sessions ({compensated} "
        f"compensated at once, {recorded} of them recorded; {orphans} stopped by the reconciler)"
    )
