"""The retry policies of the service, by name: how often and how long each kind of failure is
tried again. The loops stay where their tests pin them (named below); their numbers are here,
so "how is a start retried?" is answered by this file and ``config.py``.

- **vendor call** (:func:`vendor_call`): the one loop of ``deepbrain/retry.py``, every request
  bounded by ``ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS``; a start's attempts must all end within
  the attempt's lease (``ORCHESTRATOR_START_TIMEOUT_SECONDS``): :func:`vendor_attempts_within_lease`
  says how many fit, and ``Settings.check_consistency`` refuses settings where none does;
- **database outage** (:data:`DATABASE_OUTAGE`, :data:`DATABASE_OUTAGE_RETRIES`): a task
  whose database is away (or that asks to run later) is published again through the broker
  (``worker/tasks.py``, ``retry_when_database_is_away``), then dead-lettered;
- **recording a start** (:data:`RECORDING_A_START`, :data:`RECORD_RETRY_SECONDS`): the write of
  the vendor's yes, again for a few seconds within what the orphan grace leaves
  (``lifecycle/record.py``);
- **publish after a nack** (:data:`PUBLISH_AFTER_NACK`): a publish the broker refused, again
  within ``ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS`` (``publishing.publish_within``);
- **stop backoff** (:func:`stop_backoff`): a vendor stop that failed, again by the reaper after
  a capped backoff (``lifecycle/stop.py``, ``store.stops.stop_failed``);
- **the vendor at its limit** (:data:`MAX_CAPACITY_BOUNCES`): a start the vendor refuses for
  capacity waits for a slot again, this many times (``lifecycle/start.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.backoff import exponential_backoff
from orchestrator.config import Settings, lease_without_margin

if TYPE_CHECKING:  # the producer imports this module: it need not load the vendor client
    from orchestrator.deepbrain.retry import RetryPolicy


@dataclass(frozen=True)
class Backoff:
    """A capped exponential backoff (:func:`orchestrator.backoff.exponential_backoff`)."""

    base: float
    cap: float

    def delay(self, attempt: int) -> float:
        """The jittered delay after failed attempt ``attempt`` (1-based)."""
        return exponential_backoff(attempt, base=self.base, cap=self.cap)


DATABASE_OUTAGE = Backoff(base=0.5, cap=30.0)
DATABASE_OUTAGE_RETRIES = 100
RECORDING_A_START = Backoff(base=0.2, cap=1.0)
RECORD_RETRY_SECONDS = 5.0
PUBLISH_AFTER_NACK = Backoff(base=0.25, cap=2.0)
MAX_STOP_BACKOFF_SECONDS = 300.0
MAX_CAPACITY_BOUNCES = 5


def vendor_call() -> RetryPolicy:
    """The vendor client's policy: 4 attempts, 0.5 s doubling to 8 s, equal jitter."""
    from orchestrator.deepbrain.retry import RetryPolicy

    return RetryPolicy()


def stop_backoff(settings: Settings) -> Backoff:
    """From the stop's lease or the reaper's interval (the shorter) up to five minutes."""
    return Backoff(
        base=min(settings.stop_retry_seconds, settings.reaper_interval_seconds),
        cap=MAX_STOP_BACKOFF_SECONDS,
    )


def _least_wait(policy: RetryPolicy, retry_number: int) -> float:
    """The shortest wait the policy may draw before retry ``retry_number``."""
    cap = float(min(policy.max_delay, policy.base_delay * 2.0 ** (retry_number - 1)))
    return {"equal": cap / 2, "full": 0.0, "none": cap}[policy.jitter]


def vendor_attempts_within_lease(settings: Settings, policy: RetryPolicy | None = None) -> int:
    """How many start requests one attempt's lease can hold at most: what the lease leaves a
    vendor call (:func:`~orchestrator.config.lease_without_margin`), less a token request,
    holds each start request's ``VENDOR_TIMEOUT_SECONDS`` and the policy's shortest waits
    between them, up to its ``max_attempts``. 0: not even one start fits."""
    policy = policy or vendor_call()
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
