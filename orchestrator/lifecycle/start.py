"""Handling one ``start_session`` message: validate, claim the request, start at the vendor
with no transaction open, record the answer (or stop the vendor session again)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.deepbrain import DeepBrainError, StartedSession, VendorConflict, VendorForbidden
from orchestrator.lifecycle import metrics, store, tracing
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.requests import (
    REQUEST_ID_PATTERN,
    InvalidStartRequest,
    StartRequest,
    parse_start_request,
    payload_digest,
)
from orchestrator.lifecycle.stop import compensate, execute_stop

logger = logging.getLogger(__name__)
MAX_CAPACITY_BOUNCES = 5
START_DEADLINE_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class StartOutcome:
    request_id: str
    status: str  # the row's status when this message was done with it
    detail: str


def handle_start_message(
    lc: Lifecycle,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    claim_id: str,
    traceparent: str | None = None,
) -> StartOutcome:
    """The whole of ``orchestrator.start_session``; ``claim_id`` is the message's task id.

    ``traceparent`` is the producer's, from the message headers: the ``session.admit`` span
    continues that trace (when no instrumented consumer span already does), and the row keeps
    the admit span's context so every later span of the session joins the same trace.
    """
    parent = None if trace.get_current_span().get_span_context().is_valid else traceparent
    with tracing.session_span("session.admit", parent) as span:
        outcome = _admit(lc, args, kwargs, claim_id, tracing.current_traceparent() or traceparent)
        tracing.set_attributes(span, request_id=outcome.request_id, status=outcome.status)
        if outcome.status == "failed":
            tracing.mark_error(span, outcome.detail.split(":")[0])
        return outcome


def _admit(
    lc: Lifecycle,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    claim_id: str,
    traceparent: str | None,
) -> StartOutcome:
    digest = payload_digest({"args": list(args), "kwargs": kwargs} if args else kwargs)
    try:
        request = parse_start_request(
            args, kwargs, max_session_minutes=lc.settings.max_session_minutes
        )
    except InvalidStartRequest as error:
        request_id = _usable_request_id(kwargs.get("request_id")) or claim_id
        logger.warning("start request %s rejected: %s", request_id, error)
        store.record_invalid(
            lc.db,
            request_id=request_id,
            claim_id=claim_id,
            payload=kwargs if not args else {"args": list(args), "kwargs": kwargs},
            digest=digest,
            message=str(error),
            traceparent=traceparent,
        )
        metrics.record_start("failed")
        return StartOutcome(request_id, "failed", f"VALIDATION_ERROR: {error}")

    request_id = request.request_id or claim_id
    tracing.set_attributes(trace.get_current_span(), avatar_id=request.avatar_id)
    now = datetime.now(UTC)
    claim = store.claim(
        lc.db,
        request_id=request_id,
        claim_id=claim_id,
        payload=kwargs,
        digest=digest,
        avatar_id=request.avatar_id,
        metadata=request.metadata,
        max_duration_seconds=request.max_duration_seconds,
        start_deadline_at=(
            now + timedelta(seconds=request.start_deadline_seconds)
            if request.start_deadline_seconds
            else None
        ),
        traceparent=traceparent,
        max_concurrent_sessions=lc.settings.max_concurrent_sessions,
    )
    if claim.outcome in (store.ClaimOutcome.DUPLICATE, store.ClaimOutcome.CONFLICT):
        logger.info("start request %s: %s, ignored", request_id, claim.outcome.value)
        return StartOutcome(request_id, claim.status, claim.outcome.value)
    if claim.status == "waiting":
        metrics.record_start("waiting")
        return StartOutcome(request_id, "waiting", "waiting for a free slot")
    if claim.ticket is not None:
        return _start_with(lc, claim.ticket)
    return run_start(lc, claim.session_id, claim_id)  # a redelivery: carry on from the row


def _usable_request_id(value: object) -> str | None:
    if isinstance(value, str) and re.fullmatch(REQUEST_ID_PATTERN, value):
        return value
    return None


def run_start(lc: Lifecycle, session_id: uuid.UUID, claim_id: str) -> StartOutcome:
    """One vendor start for a ``starting`` row this claim owns; safe to call again."""
    ticket = store.begin_attempt(lc.db, session_id, claim_id)
    if ticket is None:
        return StartOutcome("", "unchanged", "no start needed")
    return _start_with(lc, ticket)


def _start_with(lc: Lifecycle, ticket: store.StartTicket) -> StartOutcome:
    request = StartRequest.model_validate(ticket.payload)
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
            outcome = _record(lc, ticket, _vendor_start(lc, request, ticket, started))
        tracing.set_attributes(span, status=outcome.status)
        if outcome.status == "failed":
            tracing.mark_error(span, outcome.detail)
        metrics.record_start(outcome.status, ticket.created_at)
        return outcome


def _call_vendor(
    lc: Lifecycle, ticket: store.StartTicket, request: StartRequest
) -> StartedSession | StartOutcome:
    """The vendor start, with no transaction open; a refusal is recorded and returned."""
    try:
        with metrics.vendor_call("start"):
            return lc.vendor.start_session(request.vendor_body(), deadline=_start_deadline(lc))
    except (VendorForbidden, VendorConflict) as error:
        # The vendor's answer past its concurrent limit is undocumented (4030 or 4090 are
        # likely): wait for a slot again, a bounded number of times.
        if ticket.attempt < MAX_CAPACITY_BOUNCES and store.back_to_waiting(
            lc.db, ticket.session_id, vendor_error=error.error_code
        ):
            logger.warning("vendor refused start of %s, waiting: %s", ticket.request_id, error)
            return StartOutcome(ticket.request_id, "waiting", error.error_code)
        failure: DeepBrainError = error
    except DeepBrainError as error:
        failure = error
    logger.warning("start of request %s failed: %s", ticket.request_id, failure)
    code = failure.error_code
    store.record_failed(
        lc.db, ticket.session_id, error_code=code, error_message=failure.vendor_message
    )
    return StartOutcome(ticket.request_id, "failed", code)


def _start_deadline(lc: Lifecycle) -> float:
    """Give up retrying in time for the reconciler: past ``START_TIMEOUT_SECONDS`` from now it
    fails a row still ``starting``, and a start that then succeeds would be stopped again."""
    timeout = lc.settings.start_timeout_seconds
    return time.monotonic() + timeout - min(START_DEADLINE_MARGIN_SECONDS, timeout / 4)


def _record(lc: Lifecycle, ticket: store.StartTicket, start: store.VendorStart) -> StartOutcome:
    """Store the vendor's yes; if the row cannot take it, stop that vendor session again."""
    vendor_id = start.vendor_session_id
    try:
        recorded = store.record_started(lc.db, ticket, start)
    except SQLAlchemyError:
        compensate(lc, vendor_id, request_id=ticket.request_id, why="database write failed")
        raise
    if recorded is False:
        compensate(lc, vendor_id, request_id=ticket.request_id, why="request no longer starting")
        return StartOutcome(ticket.request_id, "unchanged", "compensated")
    if isinstance(recorded, store.StopTicket):
        execute_stop(lc, recorded)
        return StartOutcome(ticket.request_id, "stopping", "stop requested during start")
    return StartOutcome(ticket.request_id, "active", vendor_id)


def _vendor_start(
    lc: Lifecycle, request: StartRequest, ticket: store.StartTicket, started: StartedSession
) -> store.VendorStart:
    granted_minutes = started.max_session_duration
    minutes = (
        granted_minutes or request.vendor_duration_minutes() or lc.settings.max_session_minutes
    )
    lifetime = timedelta(minutes=minutes)
    if request.max_duration_seconds is not None:
        lifetime = min(lifetime, timedelta(seconds=request.max_duration_seconds))
    return store.VendorStart(
        vendor_session_id=started.session_id,
        voice_id=started.voice_id,
        livekit_url=started.livekit_url,
        livekit_room=started.livekit_room,
        livekit_token=started.livekit_token,
        livekit_token_expires_at=jwt_expiry(started.livekit_token),
        granted_minutes=granted_minutes,
        max_session_numbers=started.max_session_numbers,
        expires_at=ticket.sent_at + lifetime,
    )


def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` claim of a JWT, read without verifying it (we only display it)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return datetime.fromtimestamp(exp, UTC) if isinstance(exp, int | float) else None
