"""The base of the service's own errors.

Every error this service raises on purpose derives from :class:`OrchestratorError`, beside
the standard class its callers may already catch (``PublishError`` is a ``RuntimeError``,
``InvalidStartRequest`` a ``ValueError``). An error an operator can fix — a setting, the
broker, the vendor — says how the command line shows it in one line (``shown_as``); any other
keeps its traceback there, because it is a bug.
"""

from __future__ import annotations

from typing import ClassVar


def first_line(error: BaseException) -> str:
    """The first non-blank line of ``error``'s text, or its class name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class OrchestratorError(Exception):
    """Base of the service's own errors.

    ``shown_as``: None for an error that is no operator's to fix; ``""`` to show the message
    as it is (it was written to be read); else the thing to check, shown before the message's
    first line (``"broker (ORCHESTRATOR_BROKER_URL)"``)."""

    shown_as: ClassVar[str | None] = None

    def operator_line(self) -> str | None:
        """The command line's one line for this error, or None (keep the traceback)."""
        if self.shown_as is None:
            return None
        if not self.shown_as:
            return str(self)
        return f"{self.shown_as}: {first_line(self)}"
