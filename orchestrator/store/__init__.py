"""Every state change of a session row, by phase: one short transaction each, guarded by a
row lock (``SELECT … FOR UPDATE``) or a conditional UPDATE. Every time compared across
processes — expiry, start timeouts, leases, retry times — is the database's ``now()``, never
a host's clock.

- :mod:`.admission`: the claim of a new request; :mod:`.waiting`: admission of waiting ones;
- :mod:`.accounts`: the accounts' rows (catalog sync, operator switches, health, recount);
- :mod:`.starts`: vendor start attempts and their answers; :mod:`.invalid`: requests that
  cannot be started;
- :mod:`.stops`: stop requests, the reaper's claim, confirmed stops;
- :mod:`.vendor_sync`: what the reconciler compares with the vendor;
- :mod:`.rows` and :mod:`.history`: what they share, and the ``session_events`` log.
"""

from orchestrator.store.accounts import (
    AccountState,
    CatalogEntry,
    Drift,
    Switch,
    account_states,
    disable_refused,
    drift,
    log_account_disabled,
    lower_cap_to_in_use,
    probe_cap_up,
    record_failure,
    record_success,
    switch,
    sync_catalog,
)
from orchestrator.store.admission import (
    ADMISSION_LOCK_KEY,
    CLAIM_FUNCTION_MIGRATION,
    DEFAULT_TENANT,
    TENANT_WAITING_CAP,
    AdmissionBusy,
    AdmissionState,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    admission_state,
    claim,
)
from orchestrator.store.ending import Ended, end
from orchestrator.store.invalid import record_invalid
from orchestrator.store.rewaiting import (
    another_account_may_serve,
    back_to_waiting,
    release_uncertain_waits,
)
from orchestrator.store.rows import (
    MAX_DURATION_REACHED,
    USER_CLOSED,
    StopTicket,
    db_now,
)
from orchestrator.store.starts import (
    AttemptBusy,
    NoStart,
    NotRecorded,
    Proceed,
    Recorded,
    StartTicket,
    VendorStart,
    begin_attempt,
    end_if_holding,
    end_if_stopped,
    log_compensation,
    record_failed,
    record_started,
    start_state,
)
from orchestrator.store.stops import (
    StopRequestResult,
    claim_due_stops,
    finish_stops,
    prune_early_stops,
    request_stop,
    seconds_to_expiries,
    stop_failed,
)
from orchestrator.store.vendor_sync import (
    END_REASON_LENGTH,
    LEASE_GRACE_SECONDS,
    LiveVendorRow,
    StuckStarts,
    database_time,
    first_sightings,
    live_vendor_rows,
    log_orphan_stop,
    owned_vendor_ids,
    record_vendor_ended,
    release_sweep_lease,
    resolve_stuck_starts,
    take_sweep_lease,
)
from orchestrator.store.waiting import admit, expire_waiting, has_waiting, open_accounts

__all__ = [
    "ADMISSION_LOCK_KEY",
    "CLAIM_FUNCTION_MIGRATION",
    "DEFAULT_TENANT",
    "END_REASON_LENGTH",
    "LEASE_GRACE_SECONDS",
    "MAX_DURATION_REACHED",
    "TENANT_WAITING_CAP",
    "USER_CLOSED",
    "AccountState",
    "AdmissionBusy",
    "AdmissionState",
    "AttemptBusy",
    "CatalogEntry",
    "Claim",
    "ClaimOutcome",
    "ClaimRequest",
    "Drift",
    "Ended",
    "LiveVendorRow",
    "NoStart",
    "NotRecorded",
    "Proceed",
    "Recorded",
    "StartTicket",
    "StopRequestResult",
    "StopTicket",
    "StuckStarts",
    "Switch",
    "VendorStart",
    "account_states",
    "admission_state",
    "admit",
    "another_account_may_serve",
    "back_to_waiting",
    "begin_attempt",
    "claim",
    "claim_due_stops",
    "database_time",
    "db_now",
    "disable_refused",
    "drift",
    "end",
    "end_if_holding",
    "end_if_stopped",
    "expire_waiting",
    "finish_stops",
    "first_sightings",
    "has_waiting",
    "live_vendor_rows",
    "log_account_disabled",
    "log_compensation",
    "log_orphan_stop",
    "lower_cap_to_in_use",
    "open_accounts",
    "owned_vendor_ids",
    "probe_cap_up",
    "prune_early_stops",
    "record_failed",
    "record_failure",
    "record_invalid",
    "record_started",
    "record_success",
    "record_vendor_ended",
    "release_sweep_lease",
    "release_uncertain_waits",
    "request_stop",
    "resolve_stuck_starts",
    "seconds_to_expiries",
    "start_state",
    "stop_failed",
    "switch",
    "sync_catalog",
    "take_sweep_lease",
]
