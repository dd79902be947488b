"""What a start does when its account refuses or fails it: the vendor's limit reply lowers
the account's cap, a pool-wide start waits for another account (an uncertain one only once
its account's list has been read), a start naming its account waits for that account, and a
row lost in a crash of the database is claimed again."""

from __future__ import annotations

import logging

from orchestrator import store
from orchestrator.accounts import DEFAULT_ACCOUNT
from orchestrator.deepbrain import DeepBrainError, VendorServerError, VendorUnavailable
from orchestrator.lifecycle import metrics
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.outcomes import RetryLater
from orchestrator.retries import waits_for_a_slot_again

logger = logging.getLogger(__name__)


def wait_for_another_account(
    lc: Lifecycle, ticket: store.StartTicket, error: DeepBrainError
) -> bool:
    """A pool-wide start its account failed (unreachable, 5xx, timeout) waits again while
    another account could serve it, a bounded number of times, instead of failing: certain
    failures for any eligible account, uncertain ones for the same account until its list has
    been read (docs/admission.md, "An uncertain start is not moved")."""
    if not waits_for_a_slot_again(lc.settings, ticket.attempt):
        return False
    if not store.another_account_may_serve(lc.db, ticket):
        return False  # one account, or a request naming it: it fails, as before accounts
    uncertain = uncertain_failure(error)
    for_what = "for its list to be read" if uncertain else "for another account"
    return _back_to_waiting(lc, ticket, error, uncertain=uncertain, for_what=for_what)


def wait_for_its_account(lc: Lifecycle, ticket: store.StartTicket, error: DeepBrainError) -> bool:
    """A start that names its account, which failed it (unreachable, 5xx, timeout), waits for
    that account alone (its waiting deadline fails it, naming the account) instead of failing:
    while the account's circuit is open (the account is sick, not the request), or while
    attempts remain (the circuit opens after a few failed calls in a row)."""
    circuit_open = store.named_account_circuit_open(lc.db, ticket)
    if circuit_open is None:
        return False  # it names no account: wait_for_another_account decides
    if not (circuit_open or waits_for_a_slot_again(lc.settings, ticket.attempt)):
        return False
    return _back_to_waiting(
        lc,
        ticket,
        error,
        uncertain=uncertain_failure(error),
        for_what="for the account it names",
    )


def _back_to_waiting(
    lc: Lifecycle,
    ticket: store.StartTicket,
    error: DeepBrainError,
    *,
    uncertain: bool,
    for_what: str,
) -> bool:
    """The failed start's row back to ``waiting`` (a lost row is claimed again), logged."""
    waiting = store.back_to_waiting(
        lc.db, ticket, vendor_error=error.error_code, uncertain=uncertain
    )
    claim_again_if_gone(waiting)
    if waiting is not store.Recorded.YES:
        return False
    logger.warning(
        "start of %s failed on account %s (%s), waiting %s: %s",
        ticket.request_id,
        ticket.account,
        error.error_code,
        for_what,
        error,
    )
    return True


def uncertain_failure(failure: DeepBrainError) -> bool:
    """Whether the start may have made a vendor session (its account's reconciler stops it
    as an orphan, with that account's key; the request is never moved to another account)."""
    if isinstance(failure, VendorUnavailable):
        return failure.uncertain
    return isinstance(failure, VendorServerError)


def note_limit(lc: Lifecycle, ticket: store.StartTicket, error: DeepBrainError) -> None:
    """A "limit reached" reply while we counted a free slot: sessions we do not know hold
    the rest, so the account's cap drops (docs/admission.md "Health")."""
    account = ticket.account or DEFAULT_ACCOUNT
    cap = store.lower_cap_to_in_use(lc.db, account, str(error))
    metrics.record_account_event(account, "limit_lowered")
    logger.warning("account %s: the vendor's limit reply lowers its cap to %s", account, cap)


def claim_again_if_gone(written: object) -> None:
    """The claim was lost in a crash of the database (it committed without waiting for the
    disk): this message must not be acknowledged, so that its redelivery claims it again."""
    if written is store.NotRecorded.GONE:
        raise RetryLater("the request's row was lost; claiming it again", 0.0)
