"""What handling a start message ends in: an outcome, or a request to run it again later."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import OrchestratorError


class RetryLater(OrchestratorError):
    """Do not acknowledge this message yet: run it again in ``delay`` seconds.

    ``abandoned_attempt`` names an attempt this delivery gave up on (its lease may be taken at
    once by the retry); ``stopped_vendor_session`` a vendor session it stopped again because
    its record seemed to fail (the retry ends the row if that record landed after all)."""

    def __init__(
        self,
        reason: str,
        delay: float,
        abandoned_attempt: str | None = None,
        stopped_vendor_session: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.delay = delay
        self.abandoned_attempt = abandoned_attempt
        self.stopped_vendor_session = stopped_vendor_session


@dataclass(frozen=True)
class StartOutcome:
    request_id: str
    status: str  # the row's status when this message was done with it
    detail: str
