"""The tenant bound to the broker user (``ORCHESTRATOR_TENANT_FROM_USER_ID``), through the
real broker: a second RabbitMQ user in this run's own vhost publishes with its ``user_id``
property (which RabbitMQ checks against the connection's user); its start belongs to that
tenant, a ``tenant`` field naming another is a ``failed`` row naming the reason, and so is a
start with no ``user_id`` at all. The guest user is left as it is."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import select

from orchestrator.config import Settings, load_settings
from orchestrator.db import Database, SessionRow
from orchestrator.simulator import SimulatorServer
from orchestrator.worker import tenant_binding
from tests.amqp import START_QUEUE_EXCHANGE, celery_headers, raw_body
from tests.conftest import (
    AMQP_HOST,
    APP_ID,
    RUN_ID,
    USER_KEY,
    WorkerProcess,
    _rabbitmqctl,
    wait_until,
)

pytestmark = [pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

TENANT = f"acme-{RUN_ID}"


@pytest.fixture(scope="module")
def tenant_url(broker_url: str) -> Iterator[str]:
    """A broker user of this test's own, allowed in this run's vhost only."""
    vhost = broker_url.rsplit("/", 1)[1]
    password = secrets.token_hex(12)
    _rabbitmqctl("add_user", TENANT, password)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, TENANT, ".*", ".*", ".*")
        yield f"amqp://{TENANT}:{password}@{AMQP_HOST}/{vhost}"
    finally:
        _rabbitmqctl("delete_user", TENANT)


@pytest.fixture(scope="module")
def bound_settings(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    broker_url: str,
    simulator_server: SimulatorServer,
) -> Settings:
    return load_settings(
        state_dir=tmp_path_factory.mktemp("bound"),
        database_url=database_url,
        broker_url=broker_url,
        deepbrain_base_url=simulator_server.base_url,
        deepbrain_app_id=APP_ID,
        deepbrain_user_key=USER_KEY,
        reconcile_interval_seconds=3600,
        vendor_timeout_seconds=5,
        tenant_from_user_id=True,
    )


@pytest.fixture(scope="module")
def worker(bound_settings: Settings) -> Iterator[WorkerProcess]:
    process = WorkerProcess(bound_settings, bound_settings.state_dir / "worker.log")
    yield process
    process.stop()


def publish(url: str, kwargs: dict[str, Any], **properties: Any) -> None:
    task_id = str(uuid.uuid4())
    with Connection(url) as conn:
        conn.Producer().publish(
            raw_body(kwargs),
            exchange=START_QUEUE_EXCHANGE,
            routing_key="orchestrator.start",
            headers=celery_headers("orchestrator.start_session", task_id),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            correlation_id=task_id,
            **properties,
        )


def settled(db: Database, request_id: str) -> SessionRow:
    def find() -> SessionRow | None:
        with db.transaction() as session:
            row = session.scalars(
                select(SessionRow).where(SessionRow.request_id == request_id)
            ).one_or_none()
            if row is not None and row.status in ("active", "failed"):
                session.expunge(row)
                return row
            return None

    found: SessionRow = wait_until(find, timeout=30)
    return found


def test_the_tenant_is_the_broker_user_and_a_forged_one_fails(
    worker: WorkerProcess,
    tenant_url: str,
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
) -> None:
    assert worker.process.poll() is None, worker.log()
    publish(tenant_url, {"request_id": "own", "avatar_id": "a"}, user_id=TENANT)
    publish(
        tenant_url,
        {"request_id": "named", "avatar_id": "a", "tenant": TENANT},
        user_id=TENANT,
    )
    publish(
        tenant_url,
        {"request_id": "forged", "avatar_id": "a", "tenant": "someone-else"},
        user_id=TENANT,
    )
    publish(broker_url, {"request_id": "anonymous", "avatar_id": "a"})  # no user_id
    own, named = settled(db, "own"), settled(db, "named")
    assert (own.status, own.tenant) == ("active", TENANT)
    assert (named.status, named.tenant) == ("active", TENANT)
    forged = settled(db, "forged")
    assert (forged.status, forged.error_code) == ("failed", "VALIDATION_ERROR")
    assert "someone-else" in (forged.error_message or "")
    assert TENANT in (forged.error_message or "")
    anonymous = settled(db, "anonymous")
    assert anonymous.status == "failed"
    assert "user_id" in (anonymous.error_message or "")
    print("\n" + json.dumps({"forged": forged.error_message, "anon": anonymous.error_message}))


class _Delivery:
    """What a worker's task.request holds of one delivery (properties and headers)."""

    def __init__(self, user_id: str | None, **headers: str) -> None:
        self.properties = {"user_id": user_id} if user_id else {}
        for name, value in headers.items():
            setattr(self, name, value)


def test_a_carried_tenant_is_believed_only_from_the_workers_own_user() -> None:
    settings = load_settings(
        broker_url="amqp://orch-worker:pw@127.0.0.1:5672/v", tenant_from_user_id=True
    )
    assert tenant_binding.broker_user(settings) == "orch-worker"
    carried = {tenant_binding.TENANT_HEADER: "acme"}
    # A retry this worker published: its own user, the tenant of the first delivery.
    assert tenant_binding.vouched_tenant(_Delivery("orch-worker", **carried), settings) == "acme"
    # A producer that sets the header itself: its own user is its tenant, the header is ignored.
    assert tenant_binding.vouched_tenant(_Delivery("mallory", **carried), settings) == "mallory"
    assert tenant_binding.vouched_tenant(_Delivery(None, **carried), settings) is None
    # What a retry of acme's start carries on: the header, and the worker's own user_id.
    headers, properties = tenant_binding.retry_carry(_Delivery("acme"), settings)
    assert (headers, properties) == (carried, {"user_id": "orch-worker"})
    off = load_settings(broker_url="amqp://orch-worker:pw@127.0.0.1:5672/v")
    assert tenant_binding.retry_carry(_Delivery("acme"), off) == ({}, {})
