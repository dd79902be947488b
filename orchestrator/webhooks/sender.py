"""The sender: ``orchestrator webhooks send``, its own process (its own deployment in the
chart), needing the database and the receivers, not the broker nor the vendor.

Each pass turns new outbox events into deliveries, leases what is due (bounded per endpoint,
in order per session) and hands each attempt to a thread of a bounded pool. A thread records
a failure itself. Successes are recorded in groups (group commit): a thread with a success
records it, and every success the other threads finished meanwhile, in one statement, unless
another thread is already recording, which then takes it in its next statement. So a busy
sender records many successes per round trip and no slot waits for a pass. Nothing waits on
a slow receiver but the threads it holds, at most ORCHESTRATOR_WEBHOOK_PER_ENDPOINT_CONCURRENCY
of them, each for at most the attempt timeout. A delivery stays in flight (its slot held)
until its outcome is recorded. A sender killed mid-attempt, or after a success it had not yet
recorded, leaves a lease that runs out: the delivery goes again, with the same
``webhook-id`` (at least once).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from orchestrator.db import Database
from orchestrator.webhooks.addresses import AddressPolicy, Resolver, system_resolver
from orchestrator.webhooks.attempt import attempt
from orchestrator.webhooks.deliveries import Claimed, claim_due, fan_out
from orchestrator.webhooks.outcomes import Success, record, record_successes
from orchestrator.webhooks.secrets import SecretBox
from orchestrator.webhooks.settings import WebhookSettings
from orchestrator.webhooks.transport import CheckedTransport

logger = logging.getLogger(__name__)
LEASE_MARGIN_SECONDS = 5.0


def policy_for(settings: WebhookSettings) -> AddressPolicy:
    return AddressPolicy(settings.allowed_hosts, settings.allowed_networks)


class Sender:
    def __init__(
        self,
        db: Database,
        settings: WebhookSettings,
        *,
        resolver: Resolver = system_resolver,
        verify: bool = True,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._box = SecretBox(settings.secret_key)
        self._owner = f"{socket.gethostname()[:40]}:{os.getpid()}"
        self._client = httpx.Client(
            transport=CheckedTransport(policy_for(settings), resolver=resolver, verify=verify),
            follow_redirects=False,
            trust_env=False,
        )
        # One thread more than attempts at once: the one recording a group of successes may
        # go on recording after its own delivery is counted out, and no attempt waits for it.
        self._pool = ThreadPoolExecutor(settings.concurrency + 1, thread_name_prefix="webhook")
        self._in_flight = 0  # claimed, outcome not yet recorded
        self._succeeded: list[Success] = []  # waiting for the thread that records
        self._recording = False  # a thread is recording successes
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._heartbeat = heartbeat
        self._last_beat = 0.0

    @property
    def lease_seconds(self) -> float:
        # httpx bounds each phase (connect, write, read); the attempt bounds the whole.
        return 3 * self._settings.timeout_seconds + LEASE_MARGIN_SECONDS

    def run(self, stop: threading.Event) -> None:
        """Pass after pass until ``stop`` is set; then the attempts under way finish."""
        logger.info("webhook sender %s started", self._owner)
        try:
            while not stop.is_set():
                try:
                    busy = self.pass_once() > 0
                    self._beat()
                except Exception:
                    logger.warning("webhook pass failed; trying again", exc_info=True)
                    busy = False
                if not busy:  # woken early when an attempt ends (a thread is free again)
                    self._wake.wait(self._settings.poll_interval_seconds)
                    self._wake.clear()
        finally:
            self.close()

    def pass_once(self) -> int:
        """Fan out new events, claim what is due and start its attempts; returns how many."""
        fan_out(self._db)
        with self._lock:
            free = self._settings.concurrency - self._in_flight
        claimed = claim_due(
            self._db,
            self._owner,
            limit=free,
            per_endpoint=self._settings.per_endpoint_concurrency,
            lease_seconds=self.lease_seconds,
        )
        for delivery in claimed:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._send, delivery)
        return len(claimed)

    def _beat(self) -> None:
        """Touch the liveness file (``orchestrator health webhooks``) after a good pass, at
        most once a second."""
        now = time.monotonic()
        if self._heartbeat is not None and now - self._last_beat >= 1.0:
            self._heartbeat()
            self._last_beat = now

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def _send(self, delivery: Claimed) -> None:
        recorded = True  # False: a success, counted out by the thread that records it
        try:
            outcome = attempt(
                self._client, self._box, delivery, timeout=self._settings.timeout_seconds
            )
            if outcome.delivered:
                assert outcome.status_code is not None
                success = Success(
                    delivery.id, delivery.endpoint_id, outcome.status_code, outcome.duration_ms
                )
                with self._lock:
                    self._succeeded.append(success)
                    leader = not self._recording
                    self._recording = True
                recorded = False
                if leader:
                    self._record_successes()
                return
            logger.info(
                "webhook %s to endpoint %s failed: %s",
                delivery.webhook_id,
                delivery.endpoint_id,
                outcome.error,
            )
            record(
                self._db,
                delivery.id,
                delivery.endpoint_id,
                outcome,
                disable_after_seconds=self._settings.disable_after_seconds,
            )
        except Exception:
            # The lease runs out and the delivery is tried again.
            logger.warning("webhook delivery %s not recorded", delivery.id, exc_info=True)
        finally:
            if recorded:
                with self._lock:
                    self._in_flight -= 1
            self._wake.set()

    def _record_successes(self) -> None:
        """Record the gathered successes, one statement per group, until none is left (those
        finished during a statement make the next group). A group whose statement fails is
        dropped: each goes again, same ``webhook-id``, once its lease runs out (as after a
        crash)."""
        while True:
            with self._lock:
                batch, self._succeeded = self._succeeded, []
                if not batch:
                    self._recording = False
                    return
            try:
                record_successes(self._db, batch)
            except Exception:
                logger.warning("%d webhook successes not recorded", len(batch), exc_info=True)
            finally:
                with self._lock:
                    self._in_flight -= len(batch)
                self._wake.set()

    def close(self) -> None:
        """Let the attempts under way finish and record their outcomes."""
        self._pool.shutdown(wait=True)
        self._client.close()
