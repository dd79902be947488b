"""Tenants: policies (guaranteed, maximum, weight, waiting cap), the choice of whose request
gets a freed slot, and the estimate of each waiting request's wait.

Pure and database-free: the admission transaction reads the backlogged tenants' usage rows
under the account's row lock, calls :func:`choose`, and writes the result (docs/admission.md
"Tenants").
"""

from orchestrator.tenants.choice import Choice, TenantState, choose
from orchestrator.tenants.estimate import (
    LiveSession,
    Pool,
    SentQuote,
    Waiter,
    WaitEstimate,
    admission_order,
    estimate_waits,
    quote,
    should_resend,
)
from orchestrator.tenants.policy import (
    DEFAULT_TENANT,
    Guarantee,
    PolicyError,
    TenantPolicy,
    default_policy,
    effective_guarantees,
    may_wait,
    policy_for,
)

__all__ = [
    "DEFAULT_TENANT",
    "Choice",
    "Guarantee",
    "LiveSession",
    "PolicyError",
    "Pool",
    "SentQuote",
    "TenantPolicy",
    "TenantState",
    "WaitEstimate",
    "Waiter",
    "admission_order",
    "choose",
    "default_policy",
    "effective_guarantees",
    "estimate_waits",
    "may_wait",
    "policy_for",
    "quote",
    "should_resend",
]
