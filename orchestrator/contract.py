"""The ``start_session`` message contract: validation, what goes to the vendor, what is secret."""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import timedelta
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from orchestrator.accounts.model import ACCOUNT_NAME, parse_labels
from orchestrator.errors import OrchestratorError

# A tenant's name, as orchestrator.tenants.TENANT_NAME (which this layer may not import).
TENANT_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"
# A stop's reason: the vendor's vocabulary (USER_CLOSED, MAX_DURATION_REACHED …) or any other
# upper-case word; checked by the producer before publishing and by the worker on receipt.
STOP_REASON_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
# Postgres text and jsonb refuse NUL, and UTF-8 cannot encode a lone surrogate.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_METADATA_BYTES = 16 * 1024
MAX_DURATION_SECONDS = 86_400
MAX_START_DEADLINE_SECONDS = 30 * 86_400
VENDOR_FIELDS = (
    "avatar_id",
    "avatar_persona",
    "max_session_duration",
    "lip_audio_mode",
    "greeting_text",
)
# Where the customer's LLM keys travel (custom_http): removed from whatever we store, at any
# depth of whatever shape the message has.
SECRET_KEYS = frozenset({"headers", "extra_headers", "auth_plugins"})
REMOVED = "[removed]"


class _Open(BaseModel):
    """Known fields are type-checked; unknown nested fields pass through to the vendor."""

    model_config = ConfigDict(extra="allow")


class CustomSettings(_Open):
    greeting_text: StrictStr | None = None
    system_prompt: StrictStr | None = None


class LlmConfigurations(_Open):
    provider: StrictStr | None = None
    model: StrictStr | None = None
    temperature: StrictFloat | StrictInt | None = None
    custom_settings: CustomSettings | None = None
    custom_http: dict[str, Any] | None = None


class AvatarPersona(_Open):
    language: StrictStr | None = None
    llm_configurations: LlmConfigurations | None = None


class StartRequest(BaseModel):
    """kwargs of ``orchestrator.start_session`` (docs/messages.md); unknown top-level keys
    are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: StrictStr | None = Field(default=None, pattern=REQUEST_ID_PATTERN)
    avatar_id: StrictStr = Field(min_length=1)
    avatar_persona: AvatarPersona | None = None
    max_session_duration: StrictInt | None = Field(default=None, ge=1)
    lip_audio_mode: StrictStr | None = None
    greeting_text: StrictStr | None = None
    max_duration_seconds: StrictInt | None = Field(default=None, ge=1, le=MAX_DURATION_SECONDS)
    start_deadline_seconds: StrictInt | None = Field(
        default=None, ge=1, le=MAX_START_DEADLINE_SECONDS
    )
    metadata: dict[str, Any] | None = None
    # Which vendor account may start it (docs/admission.md): one by name, or every account
    # carrying all these labels; neither: any enabled account.
    account: StrictStr | None = Field(default=None, pattern=f"^{ACCOUNT_NAME.pattern}$")
    account_labels: dict[str, str] | None = None
    # The tenant whose guarantees, maximum and waiting cap apply (docs/admission.md); none:
    # ``default``.
    tenant: StrictStr | None = Field(default=None, pattern=TENANT_PATTERN)

    @field_validator("account_labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> dict[str, str] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            raise ValueError("must be a non-empty object of key: value labels")
        return parse_labels(value)

    @field_validator("avatar_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(canonical_json(value).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value

    def vendor_duration_minutes(self) -> int | None:
        """``max_session_duration``, or ceil(max_duration_seconds / 60) as the vendor's backstop."""
        if self.max_session_duration is not None:
            return self.max_session_duration
        if self.max_duration_seconds is not None:
            return math.ceil(self.max_duration_seconds / 60)
        return None

    def lifetime(self, *, granted_minutes: int | None, plan_minutes: int) -> timedelta:
        """How long the session may run: the shortest of what was asked (``max_session_duration``,
        ``max_duration_seconds``, or the plan limit when neither is given), what the vendor
        granted and the plan limit (``ORCHESTRATOR_MAX_SESSION_MINUTES``). A grant never
        lengthens a session."""
        limits = [timedelta(minutes=plan_minutes)]
        if self.max_session_duration is not None:
            limits.append(timedelta(minutes=self.max_session_duration))
        if self.max_duration_seconds is not None:
            limits.append(timedelta(seconds=self.max_duration_seconds))
        if granted_minutes is not None and granted_minutes > 0:
            limits.append(timedelta(minutes=granted_minutes))
        return min(limits)

    def vendor_body(self) -> dict[str, Any]:
        """The start body: only the five vendor fields, unknown nested fields kept as given."""
        body: dict[str, Any] = {"avatar_id": self.avatar_id}
        if self.avatar_persona is not None:
            body["avatar_persona"] = self.avatar_persona.model_dump(exclude_unset=True)
        minutes = self.vendor_duration_minutes()
        if minutes is not None:
            body["max_session_duration"] = minutes
        if self.lip_audio_mode is not None:
            body["lip_audio_mode"] = self.lip_audio_mode
        if self.greeting_text is not None:
            body["greeting_text"] = self.greeting_text
        return body


class InvalidStartRequest(OrchestratorError, ValueError):
    """The message decoded but breaks the contract; ``str()`` names the fields."""


def is_valid_stop_reason(reason: object) -> bool:
    return isinstance(reason, str) and STOP_REASON_PATTERN.match(reason) is not None


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(p) for p in item["loc"]) or "kwargs"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown field '{location}'")
        elif item["type"] == "missing":
            parts.append(f"'{location}' is required")
        else:
            parts.append(f"'{location}': {item['msg']}")
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _unstorable_path(value: Any, path: str) -> tuple[str, str] | None:
    """The first place holding what Postgres cannot store, and why: text with NUL or an
    unpaired surrogate, or a number jsonb refuses (NaN, Infinity: Python's JSON reads them)."""
    if isinstance(value, str):
        return (
            (path, "contains a NUL character or an unpaired surrogate")
            if _UNSTORABLE.search(value)
            else None
        )
    if isinstance(value, float) and not math.isfinite(value):
        return path, f"{value} is not a finite number"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = _unstorable_path(key, where) or _unstorable_path(item, where)
            if found:
                return found
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _unstorable_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


def storable(value: Any) -> Any:
    """A copy Postgres can store (for recording a bad request): unstorable characters become
    U+FFFD, non-finite numbers their name as text, secrets ``[removed]``."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {storable(k): REMOVED if k in SECRET_KEYS else storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]
    return value


def parse_start_request(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, max_session_minutes: int
) -> StartRequest:
    if args:
        raise InvalidStartRequest(
            "positional arguments are not accepted; send every field as a keyword"
        )
    unstorable = _unstorable_path(kwargs, "")
    if unstorable:
        raise InvalidStartRequest(f"'{unstorable[0]}': {unstorable[1]}")
    try:
        request = StartRequest.model_validate(kwargs)
    except ValidationError as error:
        raise InvalidStartRequest(describe_validation_error(error)) from None
    if (
        request.max_session_duration is not None
        and request.max_session_duration > max_session_minutes
    ):
        raise InvalidStartRequest(
            f"'max_session_duration': must be at most {max_session_minutes} minutes"
            " (ORCHESTRATOR_MAX_SESSION_MINUTES)"
        )
    minutes = request.vendor_duration_minutes()
    if minutes is not None and minutes > max_session_minutes:
        raise InvalidStartRequest(
            f"'max_duration_seconds': {request.max_duration_seconds} s is longer than"
            f" {max_session_minutes} minutes (ORCHESTRATOR_MAX_SESSION_MINUTES)"
        )
    return request


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def payload_digest(kwargs: dict[str, Any]) -> str:
    """Tells a redelivery (same payload) from a conflicting reuse of a request_id."""
    return hashlib.sha256(canonical_json(kwargs).encode("utf-8", "surrogatepass")).hexdigest()


def secret_values(payload: Any) -> frozenset[str]:
    """Every value under a ``headers``/``extra_headers``/``auth_plugins`` key, at any depth of
    any shape (numbers as their text): what :mod:`orchestrator.masking` masks in the vendor's
    texts and in span statuses while the request is handled."""
    found: set[str] = set()

    def leaves(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                leaves(item)
        elif isinstance(value, list | tuple):
            for item in value:
                leaves(item)
        elif isinstance(value, str):
            found.add(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.add(str(value))

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                (leaves if key in SECRET_KEYS else walk)(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(payload)
    return frozenset(found)


def without_secrets(payload: Any) -> Any:
    """A copy with every ``headers``/``extra_headers``/``auth_plugins`` value replaced, at any
    depth: ``custom_http`` is where the vendor reads them, but a message of another shape
    (positional args, a misplaced block, an unknown field) must not leave them stored either."""
    if isinstance(payload, dict):
        return {k: REMOVED if k in SECRET_KEYS else without_secrets(v) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [without_secrets(item) for item in payload]
    return payload
