"""Total readers of the vendor's JSON values: any JSON value in, a usable value or a skip out,
never an exception. A value present but unusable is a *skip*: the field reads as missing, its
name is kept for the caller to log with the row's id, and a metric counts it.

What counts as usable: text without NUL or unpaired surrogates (they are removed: Postgres and
UTF-8 cannot hold them) and, for optional text, not blank; finite numbers within the range the
caller gives; times as ISO 8601 or a Unix epoch in seconds or milliseconds (a number past
1e11 is read as milliseconds: as seconds it would be after the year 5000).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import metrics

__all__ = [
    "MAX_SESSION_ID_LENGTH",
    "FieldReader",
    "clean_text",
    "is_storable_id",
    "loggable_id",
]

logger = logging.getLogger("orchestrator.deepbrain")
skipped_values = metrics.get_meter("orchestrator.deepbrain").create_counter(
    "orchestrator.vendor.skipped_values",
    unit="{value}",
    description="Values in the vendor's replies that could not be used, by field",
)

# The longest session id any of our columns hold; a longer one cannot be recorded, so the
# session it names cannot be ours (and one the vendor just started for us must be stopped).
MAX_SESSION_ID_LENGTH = 255
MAX_NUMBER_TEXT = 64  # a number or a time sent as text: longer is not one
MS_EPOCH_FROM = 1e11  # as seconds: the year 5138
INT32_MAX = 2**31 - 1
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str) -> str:
    """``value`` without NUL, and with U+FFFD for each unpaired surrogate."""
    return _UNSTORABLE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value)


def is_storable_id(value: str) -> bool:
    """A session id our columns can hold as it is (the same id, byte for byte)."""
    return 0 < len(value) <= MAX_SESSION_ID_LENGTH and _UNSTORABLE.search(value) is None


def loggable_id(value: object) -> str:
    """A session id as a log line may show it: printable, at most 80 characters."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite(value: Any) -> float | None:
    """A JSON number (or a number as short text) as a finite float; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if len(value) > MAX_NUMBER_TEXT:
            return None
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def _time(value: Any) -> datetime | None:
    if isinstance(value, str):
        if len(value) > MAX_NUMBER_TEXT:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return _epoch(_finite(value))
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return _epoch(_finite(value))


def _epoch(seconds: float | None) -> datetime | None:
    if seconds is None:
        return None
    if abs(seconds) >= MS_EPOCH_FROM:
        seconds /= 1000.0
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return None


class FieldReader:
    """Reads the fields of one reply object; ``skipped`` names the fields it could not use."""

    def __init__(self, data: Mapping[str, Any], endpoint: str) -> None:
        self._data = data
        self._endpoint = endpoint
        self.skipped: list[str] = []

    def _skip(self, name: str) -> None:
        self.skipped.append(name)
        skipped_values.add(1, {"field": name, "endpoint": self._endpoint})

    def text(self, name: str) -> str | None:
        """Optional text: a number is taken as its text; blank reads as missing."""
        value = self._data.get(name)
        if value is None:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = _finite(value)
            value = None if number is None else str(value)
        if not isinstance(value, str):
            self._skip(name)
            return None
        cleaned = clean_text(value).strip()
        return cleaned or None

    def integer(self, name: str, *, low: int, high: int = INT32_MAX) -> int | None:
        value = self._data.get(name)
        if value is None:
            return None
        number = _finite(value)
        if number is None or not number.is_integer() or not low <= number <= high:
            self._skip(name)
            return None
        return int(number)

    def number(self, name: str) -> float | None:
        value = self._data.get(name)
        if value is None:
            return None
        number = _finite(value)
        if number is None:
            self._skip(name)
        return number

    def time(self, name: str) -> datetime | None:
        value = self._data.get(name)
        if value is None or value == "":
            return None
        parsed = _time(value)
        if parsed is None:
            self._skip(name)
        return parsed

    def log_skips(self, session_id: object) -> None:
        if self.skipped:
            logger.warning(
                "deepbrain %s: session %s: ignored unusable value(s) in %s",
                self._endpoint,
                loggable_id(session_id),
                ", ".join(self.skipped),
            )
