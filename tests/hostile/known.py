"""Classes of violation the generator found whose fix is under way elsewhere: noted, not
failed on, so that the property tests keep searching past them. Each has a strict-xfail
regression test in test_hostile_regressions.py named after its shrunk case; when the fix
lands, that test passes, strict xfail turns it into a failure, and the fixer removes the mark
and the entry here.

A signature is ``invariant`` for the state checks, ``invariant:where`` for secrets, and
``stage:Exception@module:function`` for a crash (the innermost frame in our code).
"""

from __future__ import annotations

from fnmatch import fnmatchcase as fnmatch

from tests.invariants import Violation

# Violation classes a fix is under way for, signature pattern → the issue and path, each with
# a strict-xfail test in test_hostile_regressions.py. Empty: the classes first listed here
# (issue 22 paths 1, 2 and 3; docs/reliability.md, "What it found") were all fixed when issue
# 22 was merged.
KNOWN: dict[str, str] = {}


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
