"""Handling one ``start_session`` message: validate, claim the request, start at the vendor
with no transaction open, record the answer (:mod:`.record`, which stops the vendor session
again if it cannot be recorded)."""

from __future__ import annotations

import hashlib
import logging
import random
import re
import uuid
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from sqlalchemy.exc import DataError

from orchestrator import masking, store, tracing
from orchestrator.contract import (
    REQUEST_ID_PATTERN,
    InvalidStartRequest,
    StartRequest,
    parse_start_request,
    payload_digest,
    secret_values,
)
from orchestrator.deepbrain import (
    DeepBrainError,
    StartedSession,
    VendorConflict,
    VendorForbidden,
    VendorServerError,
    VendorUnavailable,
)
from orchestrator.jwt_claims import expires_at
from orchestrator.lifecycle import metrics
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.outcomes import RetryLater, StartOutcome
from orchestrator.lifecycle.record import record_vendor_yes, start_deadline
from orchestrator.lifecycle.start_refused import (
    claim_again_if_gone,
    note_limit,
    uncertain_failure,
    wait_for_another_account,
    wait_for_its_account,
)
from orchestrator.lifecycle.tenancy import tenant_of
from orchestrator.retries import waits_for_a_slot_again

logger = logging.getLogger(__name__)
MAX_CLAIM_ID_LENGTH = 255
VENDOR_LIMIT_CODE = 4030  # the vendor's "concurrent limit reached" (a 403)


@dataclass(frozen=True)
class _Message:
    """One delivery of a start message, as the steps below need it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    claim_id: str
    traceparent: str | None
    abandoned_attempt: str | None
    stopped_vendor_session: str | None = None
    vouched_tenant: str | None = None  # the broker user who published it (user_id)

    @property
    def received(self) -> dict[str, Any]:
        """What to keep of a message that cannot be started."""
        return self.kwargs if not self.args else {"args": list(self.args), "kwargs": self.kwargs}

    @property
    def digest(self) -> str:
        return payload_digest(self.received)

    @property
    def fallback_request_id(self) -> str:
        return _usable_request_id(self.kwargs.get("request_id")) or self.claim_id


def handle_start_message(
    lc: Lifecycle,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    claim_id: str,
    traceparent: str | None = None,
    abandoned_attempt: str | None = None,
    stopped_vendor_session: str | None = None,
    vouched_tenant: str | None = None,
) -> StartOutcome:
    """The whole of ``orchestrator.start_session``; ``claim_id`` is the message's task id;
    the last two are a RetryLater's, carried by the retry.

    ``traceparent`` is the producer's, from the message headers: the ``session.admit`` span
    continues that trace (when no instrumented consumer span already does), and the row keeps
    the admit span's context so every later span of the session joins the same trace.
    """
    parent = None if trace.get_current_span().get_span_context().is_valid else traceparent
    with tracing.session_span("session.admit", parent) as span:
        message = _Message(
            args,
            kwargs,
            _storable_claim_id(claim_id),
            tracing.current_traceparent() or traceparent,
            abandoned_attempt,
            stopped_vendor_session,
            vouched_tenant,
        )
        with masking.masking(secret_values(message.received)):  # in span statuses too
            outcome = _admit(lc, message)
        tracing.set_attributes(span, request_id=outcome.request_id, status=outcome.status)
        if outcome.status == "failed":
            tracing.mark_error(span, outcome.detail.split(":")[0])
        return outcome


def _storable_claim_id(task_id: str) -> str:
    """The task id as the row keeps it: any producer may send a very long one."""
    if len(task_id) <= MAX_CLAIM_ID_LENGTH:
        return task_id
    return "sha256:" + hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()


def _admit(lc: Lifecycle, message: _Message) -> StartOutcome:
    try:
        request = parse_start_request(
            message.args, message.kwargs, max_session_minutes=lc.settings.max_session_minutes
        )
    except InvalidStartRequest as error:
        return _failed(lc, message, message.fallback_request_id, str(error))

    request_id = request.request_id or message.claim_id
    tracing.set_attributes(trace.get_current_span(), avatar_id=request.avatar_id)
    unknown = _no_such_account(lc, request)
    if unknown is not None:
        return _failed(lc, message, request_id, unknown)
    bound = lc.settings.tenant_from_user_id
    tenant, refused = tenant_of(request.tenant, bound=bound, vouched=message.vouched_tenant)
    if refused is not None:
        return _failed(lc, message, request_id, refused)
    try:
        claim = store.claim(
            lc.db,
            store.ClaimRequest(
                request_id=request_id,
                claim_id=message.claim_id,
                payload=message.kwargs,
                digest=message.digest,
                avatar_id=request.avatar_id,
                metadata=request.metadata,
                max_duration_seconds=request.max_duration_seconds,
                start_deadline_seconds=request.start_deadline_seconds,
                traceparent=message.traceparent,
                account=request.account,
                labels=request.account_labels,
                tenant=tenant,
            ),
            lease_seconds=lc.settings.start_timeout_seconds,
        )
    except store.AdmissionBusy as error:
        # Admission is busy for longer than a claim may wait: an outage, not a failure.
        raise RetryLater(str(error), random.uniform(0.5, 1.5)) from None
    except DataError as error:
        # A value the checks above let through and Postgres refuses: the request still ends
        # visibly. Only the SQLSTATE is kept: the server's message may quote the payload.
        sqlstate = getattr(error.orig, "sqlstate", None) or "unknown"
        reason = f"the database cannot store this request (SQLSTATE {sqlstate})"
        return _failed(lc, message, request_id, reason)
    if claim.outcome is store.ClaimOutcome.NEW and claim.ticket is not None:
        metrics.record_admitted(lc.db, tenant)  # admitted at once, no wait
    return _after_claim(lc, message, request_id, claim)


def _no_such_account(lc: Lifecycle, request: StartRequest) -> str | None:
    """Why no account this deployment holds can ever start the request, if so."""
    accounts = lc.vendors.accounts()
    if request.account is not None and request.account not in accounts:
        return f"'account': no account named {request.account!r} here"
    if request.account_labels:
        wanted = request.account_labels
        eligible = [
            a
            for a in accounts.values()
            if a.matches(wanted) and (request.account is None or a.name == request.account)
        ]
        if not eligible:
            shown = ",".join(f"{k}={v}" for k, v in sorted(wanted.items()))
            return f"'account_labels': no account here carries {shown}"
    return None


def _after_claim(
    lc: Lifecycle, message: _Message, request_id: str, claim: store.Claim
) -> StartOutcome:
    if claim.outcome in (store.ClaimOutcome.DUPLICATE, store.ClaimOutcome.CONFLICT):
        logger.info("start request %s: %s, ignored", request_id, claim.outcome.value)
        return StartOutcome(request_id, claim.status, claim.outcome.value)
    if claim.outcome is store.ClaimOutcome.CANCELLED:
        logger.info("start request %s: stopped before it started, no vendor call", request_id)
        metrics.record_start("cancelled")
        return StartOutcome(request_id, claim.status, "stopped before it started")
    if claim.outcome is store.ClaimOutcome.REFUSED:
        logger.warning("start request %s refused: its tenant's waiting cap", request_id)
        metrics.record_start("failed")
        return StartOutcome(request_id, claim.status, f"{store.TENANT_WAITING_CAP}")
    if claim.ticket is not None:
        return start_claimed(lc, claim.ticket)
    if claim.outcome is store.ClaimOutcome.NEW:  # waiting for a slot
        metrics.record_start("waiting")
        return StartOutcome(request_id, claim.status, "waiting for a free slot")
    # A redelivery: carry on from the row.
    return run_start(
        lc,
        claim.session_id,
        message.claim_id,
        message.abandoned_attempt,
        request_id,
        stopped_vendor_session=message.stopped_vendor_session,
    )


def _failed(lc: Lifecycle, message: _Message, request_id: str, reason: str) -> StartOutcome:
    logger.warning("start request %s rejected: %s", request_id, reason)
    store.record_invalid(
        lc.db,
        request_id=request_id,
        claim_id=message.claim_id,
        payload=message.received,
        digest=message.digest,
        error_code="VALIDATION_ERROR",
        message=reason,
        traceparent=message.traceparent,
    )
    metrics.record_start("failed")
    return StartOutcome(request_id, "failed", f"VALIDATION_ERROR: {reason}")


def _usable_request_id(value: object) -> str | None:
    if isinstance(value, str) and re.fullmatch(REQUEST_ID_PATTERN, value):
        return value
    return None


def run_start(
    lc: Lifecycle,
    session_id: uuid.UUID,
    claim_id: str,
    abandoned_attempt: str | None = None,
    request_id: str = "",
    *,
    stopped_vendor_session: str | None = None,
) -> StartOutcome:
    """One vendor start for a ``starting`` row this claim owns; safe to call again. A live
    attempt of another delivery is waited for (RetryLater), never doubled.

    ``stopped_vendor_session``: an earlier delivery stopped that vendor session because its
    record seemed to fail; if the record landed after all (its commit reply was lost), the row
    holds a stopped session and is ended here."""
    if stopped_vendor_session is not None and store.end_if_holding(
        lc.db, session_id, stopped_vendor_session
    ):
        logger.warning(
            "start request %s: its record had landed after all; the session stopped then is"
            " ended now",
            request_id,
        )
    began = store.begin_attempt(
        lc.db,
        session_id,
        claim_id,
        lease_seconds=lc.settings.start_timeout_seconds,
        abandoned_attempt=abandoned_attempt,
    )
    if isinstance(began, store.AttemptBusy):
        logger.info("start request %s: another delivery is starting it, waiting", request_id)
        raise RetryLater(
            "a vendor attempt is in progress", began.seconds + random.uniform(0.5, 1.5)
        )
    if isinstance(began, store.NoStart):
        return StartOutcome(request_id, began.status, "no start needed")
    return start_claimed(lc, began)


def start_claimed(lc: Lifecycle, ticket: store.StartTicket) -> StartOutcome:
    """The vendor start of an attempt this delivery holds (its claim or ``begin_attempt``
    gave the ticket), unless a stop came meanwhile."""
    request = StartRequest.model_validate(ticket.payload)
    stopped = store.end_if_stopped(lc.db, ticket)
    claim_again_if_gone(stopped)
    if stopped is store.NotRecorded.MOVED_ON:
        return StartOutcome(ticket.request_id, "unchanged", "the row moved on before the call")
    if isinstance(stopped, store.NoStart):
        logger.info("start request %s: stopped before the vendor call", ticket.request_id)
        metrics.record_start("cancelled")
        return StartOutcome(ticket.request_id, stopped.status, "stopped before the vendor call")
    with tracing.session_span(
        "session.start",
        ticket.traceparent,
        request_id=ticket.request_id,
        avatar_id=request.avatar_id,
        attempt=ticket.attempt,
    ) as span:
        started = _call_vendor(lc, ticket, request)
        if isinstance(started, StartOutcome):
            outcome = started
        else:
            tracing.set_attributes(span, session_id=started.session_id)
            outcome = record_vendor_yes(lc, ticket, _vendor_start(lc, request, ticket, started))
        tracing.set_attributes(span, status=outcome.status)
        if outcome.status == "failed":
            tracing.mark_error(span, outcome.detail)
        metrics.record_start(outcome.status, ticket.created_at)
        return outcome


def _call_vendor(
    lc: Lifecycle, ticket: store.StartTicket, request: StartRequest
) -> StartedSession | StartOutcome:
    """The vendor start, with no transaction open; a refusal is recorded and returned. A row
    lost meanwhile (a crash of the database took its claim) is claimed again: RetryLater."""
    try:
        with lc.vendors.call(ticket.account, "start") as vendor:
            return vendor.start_session(
                request.vendor_body(),
                deadline=start_deadline(lc),
                secrets=secret_values(ticket.payload),
            )
    except (VendorForbidden, VendorConflict) as error:
        # The vendor's answer past its concurrent limit is undocumented (4030 or 4090 are
        # likely): wait for a slot again, a bounded number of times.
        if error.code == VENDOR_LIMIT_CODE:
            note_limit(lc, ticket, error)
        if waits_for_a_slot_again(lc.settings, ticket.attempt):
            waiting = store.back_to_waiting(lc.db, ticket, vendor_error=error.error_code)
            claim_again_if_gone(waiting)
            if waiting is store.Recorded.YES:
                logger.warning("vendor refused start of %s, waiting: %s", ticket.request_id, error)
                return StartOutcome(ticket.request_id, "waiting", error.error_code)
        failure: DeepBrainError = error
    except (VendorUnavailable, VendorServerError) as error:
        if wait_for_another_account(lc, ticket, error) or wait_for_its_account(lc, ticket, error):
            return StartOutcome(ticket.request_id, "waiting", error.error_code)
        failure = error
    except DeepBrainError as error:
        failure = error
    logger.warning("start of request %s failed: %s", ticket.request_id, failure)
    code = failure.error_code
    failed = store.record_failed(
        lc.db,
        ticket,
        error_code=code,
        error_message=failure.vendor_message,
        uncertain=uncertain_failure(failure),
    )
    claim_again_if_gone(failed)
    if failed is store.NotRecorded.MOVED_ON:
        return StartOutcome(ticket.request_id, "unchanged", f"{code}: the row moved on")
    return StartOutcome(ticket.request_id, "failed", code)


def _vendor_start(
    lc: Lifecycle, request: StartRequest, ticket: store.StartTicket, started: StartedSession
) -> store.VendorStart:
    granted_minutes = started.max_session_duration
    lifetime = request.lifetime(
        granted_minutes=granted_minutes, plan_minutes=lc.settings.max_session_minutes
    )
    return store.VendorStart(
        vendor_session_id=started.session_id,
        voice_id=started.voice_id,
        livekit_url=started.livekit_url,
        livekit_room=started.livekit_room,
        livekit_token=started.livekit_token,
        livekit_token_expires_at=expires_at(started.livekit_token),
        granted_minutes=granted_minutes,
        max_session_numbers=started.max_session_numbers,
        expires_at=ticket.sent_at + lifetime,
    )
