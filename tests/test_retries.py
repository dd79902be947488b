"""The retry policies (orchestrator/retries.py) take their numbers from the settings: today's
values by default, a bad value refused in one line, and a value set reaches the loop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from celery.exceptions import Reject, Retry
from sqlalchemy.exc import TimeoutError as PoolTimeout

from orchestrator import retries
from orchestrator.celery_publishing import publishing_app
from orchestrator.config import ConfigError, Settings, load_settings
from orchestrator.db import Database
from orchestrator.deepbrain import RetryPolicy
from orchestrator.lifecycle import Lifecycle, handle_start_message
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.messaging import START_TASK
from orchestrator.publishing import PublishError, publish_within
from orchestrator.simulator import SimulatorServer
from orchestrator.worker.celery_app import create_app
from orchestrator.worker.tasks import retry_when_database_is_away
from tests.helpers import row


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_the_defaults_are_the_policies_of_before() -> None:
    settings = load_settings()
    assert retries.vendor_call(settings) == RetryPolicy()
    assert retries.vendor_call(settings) == RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=8)
    assert retries.database_outage(settings) == (retries.Backoff(0.5, 30.0), 100)
    assert retries.recording_a_start(settings) == retries.Backoff(0.2, 1.0)
    # 5 s of writes; any wait ends where the orphan grace (60 s) less the vendor timeout ends.
    assert retries.record_windows(settings) == (5.0, 30.0)
    assert retries.publish_after_nack(settings) == retries.Backoff(0.25, 2.0)
    assert retries.stop_backoff(settings) == retries.Backoff(5.0, 300.0)
    assert [retries.waits_for_a_slot_again(settings, n) for n in (1, 4, 5)] == [True, True, False]
    assert retries.vendor_attempts_within_lease(settings) == 2
    # Without settings (a caller given none): the same defaults, no environment read.
    assert retries.publish_after_nack() == retries.publish_after_nack(settings)
    assert retries.database_outage() == retries.database_outage(settings)
    assert retries.vendor_call() == RetryPolicy()
    settings.check_consistency()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORCHESTRATOR_VENDOR_RETRY_ATTEMPTS", "0"),
        ("ORCHESTRATOR_VENDOR_BACKOFF_SECONDS", "0"),
        ("ORCHESTRATOR_VENDOR_BACKOFF_MAX_SECONDS", "many"),
        ("ORCHESTRATOR_DB_OUTAGE_RETRIES", "-1"),
        ("ORCHESTRATOR_DB_OUTAGE_BACKOFF_MAX_SECONDS", "1e9"),
        ("ORCHESTRATOR_RECORD_RETRY_SECONDS", "-0.5"),
        ("ORCHESTRATOR_RECORD_BACKOFF_SECONDS", "0"),
        ("ORCHESTRATOR_PUBLISH_BACKOFF_MAX_SECONDS", "-2"),
        ("ORCHESTRATOR_STOP_BACKOFF_MAX_SECONDS", "0"),
        ("ORCHESTRATOR_CAPACITY_ATTEMPTS", "1.5"),
    ],
)
@pytest.mark.usefixtures("clean_env")
def test_a_bad_retry_setting_is_refused_in_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value).startswith(f"{variable}: ")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {"ORCHESTRATOR_DB_OUTAGE_BACKOFF_SECONDS": "40"},
            (
                "ORCHESTRATOR_DB_OUTAGE_BACKOFF_SECONDS",
                "ORCHESTRATOR_DB_OUTAGE_BACKOFF_MAX_SECONDS",
            ),
        ),
        (
            {"ORCHESTRATOR_VENDOR_BACKOFF_MAX_SECONDS": "0.1"},
            ("ORCHESTRATOR_VENDOR_BACKOFF_SECONDS", "ORCHESTRATOR_VENDOR_BACKOFF_MAX_SECONDS"),
        ),
        (
            {"ORCHESTRATOR_RECORD_RETRY_SECONDS": "31"},  # the grace leaves 60 - 30 s
            ("ORCHESTRATOR_RECORD_RETRY_SECONDS", "ORCHESTRATOR_ORPHAN_GRACE_SECONDS"),
        ),
        (
            {"ORCHESTRATOR_VENDOR_RETRY_ATTEMPTS": "1", "ORCHESTRATOR_START_TIMEOUT_SECONDS": "40"},
            ("ORCHESTRATOR_START_TIMEOUT_SECONDS", "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS"),
        ),
    ],
    ids=["outage-backoff", "vendor-backoff", "record-window", "lease"],
)
@pytest.mark.usefixtures("clean_env")
def test_retry_settings_that_contradict_the_others_are_refused_naming_them(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: tuple[str, ...]
) -> None:
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings().check_consistency()
    message = str(error.value)
    assert all(name in message for name in names), message
    assert "\n" not in message


@pytest.mark.usefixtures("clean_env")
def test_the_default_record_window_is_cut_to_the_grace_not_refused() -> None:
    """Before the record window was a setting, a grace leaving less than 5 s was accepted
    (the window cut to it): it still is, the default written out included (as the tests'
    worker environments do). Another window must fit."""
    settings = load_settings(orphan_grace_seconds=32, vendor_timeout_seconds=30)
    settings.check_consistency()
    assert retries.record_windows(settings) == (2.0, 2.0)
    load_settings(
        orphan_grace_seconds=32, vendor_timeout_seconds=30, record_retry_seconds=5
    ).check_consistency()
    fits = load_settings(orphan_grace_seconds=32, vendor_timeout_seconds=30, record_retry_seconds=2)
    fits.check_consistency()
    shorter = load_settings(record_retry_seconds=1.5)
    assert retries.record_windows(shorter) == (1.5, 30.0)


# -- a value set reaches its loop -------------------------------------------------------------


@pytest.fixture
def lifecycle_for(
    settings_for: Callable[..., Settings], db: Database
) -> Iterator[Callable[..., Lifecycle]]:
    made: list[Lifecycle] = []

    def make(**overrides: object) -> Lifecycle:
        made.append(inline_lifecycle(settings_for(**overrides)))
        return made[-1]

    yield make
    for lc in made:
        lc.close()


def start(lc: Lifecycle, request_id: str) -> str:
    outcome = handle_start_message(
        lc, (), {"avatar_id": "a", "request_id": request_id}, claim_id=f"t-{request_id}"
    )
    return outcome.status


@pytest.mark.postgres
def test_vendor_retry_attempts_bound_the_start_requests(
    lifecycle_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    lc = lifecycle_for(
        vendor_retry_attempts=2, vendor_backoff_seconds=0.01, vendor_backoff_max_seconds=0.01
    )
    simulator.push_fault({"endpoint": "start", "status": 503, "count": 5})
    assert start(lc, "twice") == "failed"
    assert simulator.stats()["endpoints"]["start"]["calls"] == 2


@pytest.mark.postgres
def test_capacity_attempts_bound_the_returns_to_waiting(
    lifecycle_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    """With the default (5) a refusal for the vendor's limit waits again
    (test_admission.py::test_vendor_at_its_limit_puts_the_request_back_to_waiting); with 1
    the first refusal fails the request."""
    lc = lifecycle_for(max_concurrent_sessions=2, capacity_attempts=1)
    simulator.push_fault({"endpoint": "start", "status": 403, "code": 4030, "message": "limit"})
    assert start(lc, "once") == "failed"
    assert row(lc.db, "once").error_code == "VENDOR_4030"


@pytest.mark.postgres
@pytest.mark.parametrize(("done", "gives_up"), [(1, False), (2, True)])
def test_db_outage_retries_bound_a_task_s_retries(
    settings_for: Callable[..., Settings], done: int, gives_up: bool
) -> None:
    """A task that has been retried ``done`` times meets the database away again: with
    ``DB_OUTAGE_RETRIES=2`` the second retry is the last (then dead-lettered, not retried)."""
    app = create_app(settings_for(db_outage_retries=2))
    task = app.tasks[START_TASK]
    task.push_request(id="outage-task", retries=done)
    try:
        expected = Reject if gives_up else Retry
        with pytest.raises(expected), retry_when_database_is_away(task):
            raise PoolTimeout("the pool is full")
    finally:
        task.pop_request()
        app.close()


@pytest.mark.postgres
def test_the_publish_backoff_setting_reaches_the_publishing_apps(
    settings_for: Callable[..., Settings],
) -> None:
    settings = settings_for(publish_backoff_seconds=0.05, publish_backoff_max_seconds=0.1)
    producer_app = publishing_app(settings)
    worker_app = create_app(settings)
    try:
        assert producer_app.publish_backoff == retries.Backoff(0.05, 0.1)
        assert worker_app.publish_backoff == retries.Backoff(0.05, 0.1)
    finally:
        producer_app.close()
        worker_app.close()


@pytest.mark.parametrize(("backoff", "fewest", "most"), [(0.01, 30, 1000), (0.2, 5, 13)])
def test_a_refused_publish_is_published_again_after_its_backoff_within_the_bound(
    backoff: float, fewest: int, most: int
) -> None:
    """Within a bound of 1 s, the backoff given decides how often a refused publish is tried:
    with 0.2 s (waits of 0.1 to 0.2 s) 6 to 12 times, with 0.01 s a hundred times or more."""
    attempts: list[float] = []

    def refused(seconds_left: float) -> None:
        attempts.append(seconds_left)
        raise ConnectionRefusedError("nothing listens")

    began = time.monotonic()
    with pytest.raises(PublishError, match=r"within 1 s \(\d+ attempts; last: Connection"):
        publish_within(1.0, refused, "a test message", retries.Backoff(backoff, backoff))
    assert time.monotonic() - began < 1.5
    assert fewest <= len(attempts) <= most, len(attempts)
