"""Classes of violation the generator found that issue 22 is fixing (its paths are being
closed by other work at the same time). Each has a strict-xfail regression test in
test_hostile_regressions.py named after its shrunk case; when a fix lands, that test passes,
strict xfail turns it into a failure, and the fixer removes the mark and the entry here.

A signature is ``invariant`` for the state checks, ``invariant:where`` for secrets, and
``stage:Exception@module:function`` for a crash (the innermost frame in our code).
"""

from __future__ import annotations

from fnmatch import fnmatchcase as fnmatch

from tests.invariants import Violation

_ECHO = "issue 22 path 2: a vendor error that echoes the request leaks the customer's keys"
_VALUES = "issue 22 path 1: vendor values are untrusted input"
KNOWN: dict[str, str] = {
    # a vendor value Python cannot turn into a datetime/float ends the whole pass
    "reconcile-completes:*:*Error@deepbrain/models.py:*": _VALUES,
    "start-ends-known:start:*Error@deepbrain/models.py:*": _VALUES,
    # the LiveKit token's exp (a vendor value too) in milliseconds, inf or huge
    "start-ends-known:start:*Error@lifecycle/start.py:jwt_expiry": _VALUES,
    "start-ends-known:start:*Error@deepbrain/auth.py:*": _VALUES,
    # a vendor session id or text Postgres cannot store (NUL, too long) fails the write
    # (session id with NUL; an envelope code of 60 digits making error_code longer than its
    # column; a stop error's message with NUL in the stop's history …)
    "*:DataError@lifecycle/store/*": _VALUES,
    "*:UnicodeEncodeError@lifecycle/store/*": _VALUES,  # a lone surrogate in vendor text
    # a start reply's max_session_numbers <= 0 (or past int4) is kept and every later
    # admission fails in orchestrator_admission_state (negative LIMIT); path 8 keeps that limit
    "admission-completes:admit:DataError@lifecycle/store/admission.py:*": _VALUES,
    "serves-after-heal:failed:VALIDATION_ERROR:*SQLSTATE 2201W*": _VALUES,
    "expiry-ask": "issue 22 path 3: the vendor's grant outlives the ask",
    # where a vendor's error text goes: the failed row, its event, its history, its log line
    "secret:table sessions.error_message": _ECHO,
    "secret:table event_outbox.body": _ECHO,
    "secret:table session_events.detail": _ECHO,
    "secret:log": _ECHO,
}


def signature(violation: Violation) -> str:
    if violation.invariant.endswith("-completes") or violation.invariant == "start-ends-known":
        stage, _, rest = violation.detail.partition(":")
        return f"{violation.invariant}:{stage.split('.')[-1]}:{rest}"
    if violation.invariant == "serves-after-heal":
        return f"{violation.invariant}:{violation.detail}"
    if violation.invariant == "secret":
        return "secret:" + violation.detail.rsplit(" is in ", 1)[-1]
    return violation.invariant


def known_path(violation: Violation) -> str | None:
    found = signature(violation)
    return next((path for pattern, path in KNOWN.items() if fnmatch(found, pattern)), None)
