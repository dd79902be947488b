"""One trace per session lifecycle, across the producer, a real worker process and the reaper;
metrics through an in-memory reader; no secret in any span."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle, handle_start_message, reap, reconcile, request_stop
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.lifecycle.metrics import register_gauges
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from orchestrator.telemetry import setup_telemetry, span_record
from tests.amqp import publish_raw
from tests.conftest import APP_ID, USER_KEY, WorkerProcess, settings_env, wait_until
from tests.helpers import row, row_or_none

pytestmark = [pytest.mark.postgres]


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()

    def span_records(self) -> list[dict[str, Any]]:
        return [span_record(s) for s in self.spans.get_finished_spans()]

    def metric_points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        points = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points


@pytest.fixture(scope="session")
def telemetry() -> Telemetry:
    """In-memory exporters for this test process (providers are global: installed once)."""
    installed = Telemetry()
    assert setup_telemetry(span_exporters=[installed.spans], metric_readers=[installed.metrics])
    return installed


@pytest.fixture
def traced_worker(
    settings_for: Callable[..., Settings],
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
    purge_queues: Callable[[], None],
    tmp_path: Path,
) -> Iterator[tuple[Settings, Path]]:
    purge_queues()
    settings = settings_for(
        broker_url=broker_url, reaper_interval_seconds=0.5, orphan_grace_seconds=5.0
    )
    span_file = tmp_path / "worker-spans.jsonl"
    env_extra = {"ORCHESTRATOR_TRACE_FILE": str(span_file), "OTEL_TRACES_EXPORTER": "none"}
    worker = WorkerProcess(settings, tmp_path / "worker.log", "--beat", env_extra=env_extra)
    try:
        yield settings, span_file
    finally:
        worker.stop()


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_strings(records: list[dict[str, Any]]) -> str:
    return json.dumps([{k: r[k] for k in ("name", "attributes", "events")} for r in records])


@pytest.mark.broker
@pytest.mark.worker
def test_one_trace_from_enqueue_to_the_reapers_stop(
    telemetry: Telemetry,
    traced_worker: tuple[Settings, Path],
    db: Database,
    simulator: SimulatorServer,
) -> None:
    settings, span_file = traced_worker
    telemetry.spans.clear()
    producer = Producer(settings)
    try:
        request_id = producer.enqueue_start_session(avatar_id="traced", max_duration_seconds=1)
        info = producer.wait_for_session(request_id, timeout=20)
    finally:
        producer.close()
    livekit_token = info.livekit_token
    assert livekit_token
    wait_until(lambda: row(db, request_id).status == "ended", timeout=20)

    (enqueue,) = [s for s in telemetry.span_records() if s["name"] == "session.enqueue"]
    trace_id = enqueue["trace_id"]
    assert enqueue["attributes"]["orchestrator.request_id"] == request_id

    def session_spans() -> list[dict[str, Any]] | None:
        spans = [s for s in read_spans(span_file) if s["trace_id"] == trace_id]
        names = {s["name"] for s in spans}
        publishes = [s for s in spans if s["name"] == "session.event.publish"]
        if "session.stop" in names and len(publishes) >= 2:
            return spans
        return None

    spans = wait_until(session_spans, timeout=15)
    names = [s["name"] for s in spans]
    for expected in ("session.admit", "session.start", "session.stop", "session.event.publish"):
        assert expected in names, names
    assert any(n.startswith("run/orchestrator.start_session") for n in names), names
    assert any(
        s["attributes"].get("http.request.method") == "POST" or s["name"] == "POST" for s in spans
    )
    assert any(
        s["attributes"].get("db.system") == "postgresql"
        or s["attributes"].get("db.system.name") == "postgresql"
        for s in spans
    )
    (stop,) = [s for s in spans if s["name"] == "session.stop"]
    assert stop["attributes"]["orchestrator.end_reason"] == "MAX_DURATION_REACHED"
    assert stop["attributes"]["orchestrator.session_id"] == row(db, request_id).vendor_session_id
    assert {s["resource"]["service.name"] for s in spans} == {"session-orchestrator"}
    # The sweep that ended it is its own trace, linked to this one.
    sweeps = [
        s for s in read_spans(span_file) if s["name"] == "session.reap" and trace_id in s["links"]
    ]
    assert sweeps and sweeps[0]["trace_id"] != trace_id

    everything = all_strings(read_spans(span_file) + telemetry.span_records())
    for secret in (APP_ID, USER_KEY, livekit_token, "eyJ"):
        assert secret not in everything


@pytest.mark.broker
@pytest.mark.worker
def test_traceparent_from_a_plain_kombu_producer_is_continued(
    telemetry: Telemetry, traced_worker: tuple[Settings, Path], broker_url: str, db: Database
) -> None:
    _, span_file = traced_worker
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    publish_raw(
        broker_url,
        {"request_id": "foreign-1", "avatar_id": "a"},
        headers={"traceparent": traceparent},
    )
    wait_until(lambda: (r := row_or_none(db, "foreign-1")) and r.status == "active")
    spans = wait_until(
        lambda: [
            s
            for s in read_spans(span_file)
            if s["name"] == "session.start" and s["trace_id"] == trace_id
        ],
        timeout=10,
    )
    assert spans
    assert row(db, "foreign-1").traceparent.split("-")[1] == trace_id


def test_lifecycle_metrics_and_spans_in_process(
    telemetry: Telemetry, lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    telemetry.spans.clear()
    register_gauges(lifecycle.db)
    handle_start_message(lifecycle, (), {"avatar_id": "m", "request_id": "m-1"}, claim_id="m-1")
    handle_start_message(
        lifecycle,
        (),
        {"avatar_id": "m", "request_id": "m-2", "max_duration_seconds": 1},
        claim_id="m-2",
    )
    handle_start_message(lifecycle, (), {"request_id": "m-bad"}, claim_id="m-bad")
    simulator.push_fault({"endpoint": "start", "status": 402, "code": 4020})
    handle_start_message(
        lifecycle, (), {"avatar_id": "m", "request_id": "m-broke"}, claim_id="m-broke"
    )
    request_stop(lifecycle, request_id="m-1")
    wait_until(lambda: reap(lifecycle).claimed == 1, timeout=5, interval=0.2)

    outcomes = {
        dict(p.attributes)["outcome"]: p.value
        for p in telemetry.metric_points("orchestrator.session.starts")
    }
    assert outcomes["active"] >= 2 and outcomes["failed"] >= 2
    vendor = {
        (dict(p.attributes)["endpoint"], dict(p.attributes)["outcome"]): p.count
        for p in telemetry.metric_points("orchestrator.vendor.duration")
    }
    assert vendor[("start", "ok")] >= 2 and vendor[("start", "VENDOR_4020")] >= 1
    assert vendor[("stop", "ok")] >= 2
    errors = {
        dict(p.attributes)["error_code"]
        for p in telemetry.metric_points("orchestrator.vendor.errors")
    }
    assert "VENDOR_4020" in errors
    assert sum(p.count for p in telemetry.metric_points("orchestrator.reaper.lag")) >= 1
    assert sum(p.count for p in telemetry.metric_points("orchestrator.session.start_latency")) >= 2
    assert [p.value for p in telemetry.metric_points("orchestrator.sessions.live")][-1] == 0

    failed_start = [
        s
        for s in telemetry.span_records()
        if s["name"] == "session.start"
        and s["attributes"].get("orchestrator.error_code") == "VENDOR_4020"
    ]
    assert failed_start and failed_start[0]["status"] == "ERROR"
    assert "eyJ" not in all_strings(telemetry.span_records())


def test_disabled_sdk_installs_nothing(tmp_path: Path) -> None:
    code = "from orchestrator.telemetry import setup_telemetry; print(setup_telemetry())"
    for env in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**settings_env_base(), **env},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == "False"


def settings_env_base() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ORCHESTRATOR_"))}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


@pytest.mark.broker
@pytest.mark.worker
def test_worker_and_beat_serve_prometheus_metrics(
    settings_for: Callable[..., Settings],
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
    purge_queues: Callable[[], None],
    tmp_path: Path,
) -> None:
    purge_queues()
    settings = settings_for(broker_url=broker_url, orphan_grace_seconds=5.0)
    port, beat_port = free_port(), free_port()
    prometheus = {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
    }
    worker = WorkerProcess(
        settings,
        tmp_path / "worker.log",
        env_extra={**prometheus, "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)},
    )
    beat_env = {
        **settings_env(settings),
        **prometheus,
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(beat_port),
    }
    beat = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "beat"],
        env=beat_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        publish_raw(broker_url, {"request_id": "prom-1", "avatar_id": "a"})
        wait_until(lambda: (r := row_or_none(db, "prom-1")) and r.status == "active")
        text = wait_until(
            lambda: (t := scrape(port)) and "orchestrator_session_starts" in t and t, timeout=10
        )
        starts = re.search(
            r'^orchestrator_session_starts_total\{[^}]*outcome="active"[^}]*\} (\S+)$', text, re.M
        )
        assert starts and float(starts[1]) == 1.0, text
        live = re.search(r"^orchestrator_sessions_live\{.*\} (\S+)$", text, re.M)
        assert live and float(live[1]) == 1.0, text
        assert "process_cpu_seconds_total" in text
        # Beat serves its own /metrics (its process's; the sessions' are the workers').
        beat_text = wait_until(lambda: _scrape_or_none(beat_port), timeout=20)
        assert "process_cpu_seconds_total" in beat_text
        # Another command in the same container does not try to take the worker's port.
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "status", "prom-1"],
            env={
                **settings_env(settings),
                **prometheus,
                "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "active"
    finally:
        beat.terminate()
        beat.wait(timeout=20)
        worker.stop()


def _scrape_or_none(port: int) -> str | None:
    try:
        return scrape(port)
    except httpx.TransportError:
        return None


SQL_FAILURES = """
import json, sys
from orchestrator.telemetry import setup_telemetry, shutdown_telemetry
assert setup_telemetry()  # first, as the worker does: then the engine is instrumented
from sqlalchemy import text
from orchestrator import masking
from orchestrator.db import Database
known, unknown, url = sys.argv[1:4]
db = Database(url, pool_size=1)
with masking.masking({known}):
    try:
        with db.transaction() as session:
            session.execute(text("SELECT CAST(:v AS integer)"), {"v": known})
    except Exception:
        pass
    try:
        with db.transaction() as session:
            session.execute(
                text(
                    "INSERT INTO sessions (id, request_id, status, request_payload,"
                    " payload_sha256) VALUES (gen_random_uuid(), 'r', 'bogus', :p, '0')"
                ),
                {"p": json.dumps({"headers": {"Authorization": unknown}})},
            )
    except Exception:
        pass
db.dispose()
shutdown_telemetry()
"""


def test_a_failed_sql_statements_span_status_quotes_no_secret(
    tmp_path: Path, database_url: str
) -> None:
    """The server's message of a failed statement may quote data: a value (the primary line,
    masked by value while a request's secrets are known) or the whole failing row (a DETAIL
    line, dropped). Neither reaches a span's status text or its exception events (a process
    that sets up telemetry first, as the worker does)."""
    known, unknown = "sk-span-SECRET-9d2e41", "sk-row-SECRET-77c1a0"
    span_file = tmp_path / "spans.jsonl"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "ORCHESTRATOR_TRACE_FILE": str(span_file),
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
    }
    subprocess.run(
        [sys.executable, "-c", SQL_FAILURES, known, unknown, database_url],
        env=env,
        check=True,
        timeout=60,
    )
    spans = [json.loads(line) for line in span_file.read_text().splitlines()]
    texts = [s["status_text"] for s in spans if s.get("status_text")]
    assert any("invalid input syntax" in t for t in texts), texts
    assert any("check constraint" in t for t in texts), texts
    everything = span_file.read_text()
    assert known not in everything and unknown not in everything, texts


def test_skipped_vendor_values_and_failed_reconcile_passes_are_counted(
    telemetry: Telemetry, settings_for: Callable[..., Settings], db: Database
) -> None:
    """The two counters the alert in docs/operations.md reads."""
    lifecycle = inline_lifecycle(settings_for(deepbrain_base_url="http://vendor.test"))

    def skipped() -> float:
        points = telemetry.metric_points("orchestrator.vendor.skipped_values")
        return sum(p.value for p in points if dict(p.attributes)["field"] == "created_at")

    def failed(reason: str) -> float:
        points = telemetry.metric_points("orchestrator.reconcile.failed_passes")
        return sum(p.value for p in points if dict(p.attributes)["reason"] == reason)

    skipped_before, failed_before = skipped(), failed("vendor_error")
    sessions = "http://vendor.test/api/v2/sessions"
    try:
        with respx.mock(assert_all_called=False) as vendor:
            vendor.get(sessions).respond(
                json={
                    "code": 1000,
                    "message": "ok",
                    "data": {"next": None, "results": [{"sessionId": "x", "created_at": [1]}]},
                }
            )
            reconcile(lifecycle)
        with lifecycle.db.transaction() as session:
            session.execute(text("UPDATE sweep_leases SET finished_at = NULL"))
        with respx.mock(assert_all_called=False) as vendor:
            vendor.get(sessions).respond(status_code=502, text="bad gateway")
            assert reconcile(lifecycle).vendor_error
    finally:
        lifecycle.close()
    assert skipped() == skipped_before + 1
    assert failed("vendor_error") == failed_before + 1


def test_per_tenant_metrics_keep_configured_names_and_fold_the_rest_into_other(
    telemetry: Telemetry, db: Database, settings_for: Callable[..., Settings]
) -> None:
    """In use, waiting, admitted and the wait of the admitted, by tenant: a tenant with a
    policy row (and default) keeps its name, any other name a message brings is ``other``."""
    from orchestrator.lifecycle.metrics import tenant_labels
    from orchestrator.store.tenants import set_policy
    from orchestrator.tenants import TenantPolicy

    set_policy(db, TenantPolicy(name="gold", guaranteed=1))
    tenant_labels.forget()  # the policy was set just now
    lc = inline_lifecycle(settings_for(max_concurrent_sessions=2))
    try:
        register_gauges(lc.db)

        def by_tenant(name: str) -> dict[str, float]:
            return {p.attributes["tenant"]: p.value for p in telemetry.metric_points(name)}

        before = by_tenant("orchestrator.tenant.admitted")
        for rid, tenant in [("g1", "gold"), ("x1", "stranger-1"), ("g2", "gold"), ("y1", "zz")]:
            message = {"avatar_id": "m", "request_id": rid, "tenant": tenant}
            handle_start_message(lc, (), message, claim_id=rid)
        assert [row(db, r).status for r in ("g1", "x1", "g2", "y1")] == ["active"] * 2 + [
            "waiting"
        ] * 2
        assert by_tenant("orchestrator.tenant.waiting") == {"gold": 1, "other": 1}
        with db.transaction() as session:  # as if they had waited a minute
            session.execute(
                text(
                    "UPDATE sessions SET created_at = created_at - interval '60 s'"
                    " WHERE status = 'waiting'"
                )
            )
        request_stop(lc, request_id="g1")
        request_stop(lc, request_id="x1")  # each freed slot admits a waiting request
        assert [row(db, r).status for r in ("g2", "y1")] == ["active"] * 2
        assert by_tenant("orchestrator.tenant.in_use") == {"gold": 1, "other": 1}
        admitted = by_tenant("orchestrator.tenant.admitted")
        assert admitted["gold"] - before.get("gold", 0) == 2
        assert admitted["other"] - before.get("other", 0) == 2
        assert not any(t.startswith(("stranger", "zz")) for t in admitted)
        waits = {
            p.attributes["tenant"]: p
            for p in telemetry.metric_points("orchestrator.tenant.wait_time")
        }
        assert {"gold", "other"} <= set(waits) <= {"gold", "other", "default"}
        assert waits["gold"].max >= 59 and waits["other"].max >= 59
    finally:
        lc.close()
