"""The retry policies of the service, by name: how often and how long each kind of failure is
tried again. Their numbers are settings (``config.py``, ``ORCHESTRATOR_*``, defaults in the
README's table), so "how is a start retried?" is answered by this file and ``config.py``.

- **vendor call** (:func:`vendor_call`): every request to the vendor, at most
  ``VENDOR_RETRY_ATTEMPTS`` attempts with backoff (``VENDOR_BACKOFF_SECONDS`` doubling to
  ``VENDOR_BACKOFF_MAX_SECONDS``), each bounded by ``VENDOR_TIMEOUT_SECONDS``. A start's
  attempts must all end within the attempt's lease (``START_TIMEOUT_SECONDS``):
  :func:`vendor_attempts_within_lease` says how many fit, and ``Settings.check_consistency``
  refuses settings where none does;
- **database outage** (:func:`database_outage`): a task whose database is away (or that asks
  to run later) is published again through the broker after a backoff, at most
  ``DB_OUTAGE_RETRIES`` times, then dead-lettered;
- **recording a start** (:func:`recording_a_start`, :func:`record_windows`): the write of the
  vendor's yes, again for ``RECORD_RETRY_SECONDS`` within what the orphan grace leaves, then
  the session is stopped again (compensation);
- **publish after a nack** (:func:`publish_after_nack`, the loop :func:`publish_within`): a
  publish the broker refused, again with backoff within ``PUBLISH_TIMEOUT_SECONDS``;
- **stop backoff** (:func:`stop_backoff`): a vendor stop that failed, again by the reaper
  after a backoff up to ``STOP_BACKOFF_MAX_SECONDS``;
- **the vendor at its limit** (:func:`waits_for_a_slot_again`): a start the vendor refuses for its
  concurrent limit waits for a slot again, until its ``CAPACITY_ATTEMPTS``-th attempt.

Only the publish loop lives here. The others stay beside what they retry, because this module
is a leaf the lifecycle, the producer and ``config.py`` import (``make lint`` checks it):

- the vendor call's loop, ``deepbrain/retry.py`` (``call_with_retry``): the vendor client is
  the lowest layer and knows nothing of the database, and ``config.py`` (imported here) may
  start the embedded PostgreSQL;
- the database outage's, ``worker/tasks.py`` (``retry_when_database_is_away``): it is Celery's
  ``Task.retry`` and ``Reject``, which nothing below the worker may import;
- recording a start's, ``lifecycle/record.py`` (``_record_within``): each try is a store write,
  a re-read and at last a compensating vendor stop; here it would import the lifecycle and
  the store, which import this module;
- the stop backoff has no loop: ``store.stops.stop_failed`` stores the next try's time with
  the row, and whichever reaper comes next tries again (``lifecycle/stop.py``);
- the vendor at its limit: ``lifecycle/start.py`` puts the row back to ``waiting``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from orchestrator.backoff import exponential_backoff
from orchestrator.config import Settings, lease_without_margin

if TYPE_CHECKING:  # the producer imports this module: it need not load the vendor client
    from orchestrator.deepbrain.retry import RetryPolicy

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """A capped exponential backoff (:func:`orchestrator.backoff.exponential_backoff`)."""

    base: float
    cap: float

    def delay(self, attempt: int) -> float:
        """The jittered delay after failed attempt ``attempt`` (1-based)."""
        return exponential_backoff(attempt, base=self.base, cap=self.cap)


def _number(settings: Settings | None, name: str) -> float:
    """A policy's number from ``settings``; without them, the setting's default."""
    if settings is None:
        default = Settings.model_fields[name].default
        assert isinstance(default, int | float)
        return default
    value = getattr(settings, name)
    assert isinstance(value, int | float)
    return value


def _backoff(settings: Settings | None, policy: str) -> Backoff:
    return Backoff(
        base=_number(settings, f"{policy}_backoff_seconds"),
        cap=_number(settings, f"{policy}_backoff_max_seconds"),
    )


def vendor_call(settings: Settings | None = None) -> RetryPolicy:
    """The vendor client's policy (defaults: 4 attempts, 0.5 s doubling to 8 s, equal jitter)."""
    from orchestrator.deepbrain.retry import RetryPolicy

    return RetryPolicy(
        max_attempts=int(_number(settings, "vendor_retry_attempts")),
        base_delay=_number(settings, "vendor_backoff_seconds"),
        max_delay=_number(settings, "vendor_backoff_max_seconds"),
    )


def database_outage(settings: Settings | None = None) -> tuple[Backoff, int]:
    """The backoff of a task waiting out the database, and how many retries before the
    message is dead-lettered (defaults: 0.5 s doubling to 30 s, 100 retries)."""
    return _backoff(settings, "db_outage"), int(_number(settings, "db_outage_retries"))


def recording_a_start(settings: Settings | None = None) -> Backoff:
    """The pause between writes of the vendor's yes (defaults: 0.2 s doubling to 1 s)."""
    return _backoff(settings, "record")


def record_windows(settings: Settings) -> tuple[float, float]:
    """Seconds from the vendor's reply: how long a write of its yes is tried again, and how
    long any wait of the record may last (a full pool is not the database's fault and is
    waited out longer). Neither outlasts what the orphan grace leaves after the vendor's
    reply (past it the reconciler takes the unrecorded session for an orphan); the wait also
    ends with the attempt's lease."""
    before_orphan = max(0.0, settings.orphan_grace_seconds - settings.vendor_timeout_seconds)
    return (
        min(settings.record_retry_seconds, before_orphan),
        min(lease_without_margin(settings.start_timeout_seconds), before_orphan),
    )


def publish_after_nack(settings: Settings | None = None) -> Backoff:
    """The pause before publishing again (defaults: 0.25 s doubling to 2 s)."""
    return _backoff(settings, "publish")


def stop_backoff(settings: Settings) -> Backoff:
    """From the stop's lease or the reaper's interval (the shorter) up to
    ``STOP_BACKOFF_MAX_SECONDS`` (five minutes)."""
    return Backoff(
        base=min(settings.stop_retry_seconds, settings.reaper_interval_seconds),
        cap=settings.stop_backoff_max_seconds,
    )


def waits_for_a_slot_again(settings: Settings, attempt: int) -> bool:
    """Whether a start the vendor refused for its limit at attempt ``attempt`` (1-based)
    waits for a slot again (else it fails)."""
    return attempt < settings.capacity_attempts


def publish_within(
    bound: float,
    attempt: Callable[[float], T],
    what: str,
    *,
    backoff: Backoff,
    retryable: tuple[type[BaseException], ...],
    refused: Callable[[str], Exception],
) -> T:
    """``attempt(seconds left)`` until it returns, again with ``backoff`` after each error of
    ``retryable`` (one the broker may recover from), for ``bound`` seconds in all; then
    ``refused(why)`` is raised. The broker's errors and ``PublishError`` are given by the
    caller (``publishing.publish_within``): this module may not import kombu."""
    deadline = time.monotonic() + bound
    attempts = 0
    while True:
        try:
            return attempt(max(deadline - time.monotonic(), 0.1))
        except retryable as error:
            attempts += 1
            why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if time.monotonic() >= deadline:
                raise refused(
                    f"could not publish {what} within {bound:g} s ({attempts} attempts;"
                    f" last: {why})"
                ) from None
            delay = backoff.delay(attempts)
            delay = min(delay, max(0.0, deadline - time.monotonic()))
            logger.warning("publish of %s refused (%s); again in %.1f s", what, why, delay)
            time.sleep(delay)


def _least_wait(policy: RetryPolicy, retry_number: int) -> float:
    """The shortest wait the policy may draw before retry ``retry_number``."""
    cap = float(min(policy.max_delay, policy.base_delay * 2.0 ** (retry_number - 1)))
    return {"equal": cap / 2, "full": 0.0, "none": cap}[policy.jitter]


def vendor_attempts_within_lease(settings: Settings, policy: RetryPolicy | None = None) -> int:
    """How many start requests one attempt's lease can hold at most: what the lease leaves a
    vendor call (:func:`~orchestrator.config.lease_without_margin`), less a token request,
    holds each start request's ``VENDOR_TIMEOUT_SECONDS`` and the policy's shortest waits
    between them, up to its ``max_attempts``. 0: not even one start fits."""
    policy = policy or vendor_call(settings)
    timeout = settings.vendor_timeout_seconds
    budget = lease_without_margin(settings.start_timeout_seconds) - timeout  # the token
    used = 0.0
    attempts = 0
    while attempts < policy.max_attempts:
        wait = _least_wait(policy, attempts) if attempts else 0.0
        if used + wait + timeout > budget:
            break
        used += wait + timeout
        attempts += 1
    return attempts
