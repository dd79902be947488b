"""One vendor account as the operator defines it: a name, its key pair, an optional cap,
a routing weight and labels. The secrets are ``SecretStr``: never in a repr, a log line or
an error message."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

ACCOUNT_NAME: Final = re.compile(r"[a-z0-9-]{1,63}")
LABEL_KEY: Final = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
DEFAULT_ACCOUNT: Final = "default"
#: Fields of an account definition (a file's keys; the variables' suffixes upper-cased).
FIELDS: Final = ("app_id", "user_key", "cap", "weight", "labels")
SECRET_FIELDS: Final = frozenset({"app_id", "user_key"})


def parse_labels(value: Any) -> dict[str, str]:
    """Labels from an object ``{"region": "eu"}`` or a string ``"region=eu,tier=gold"``."""
    if isinstance(value, str):
        pairs: list[tuple[str, str]] = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            key, sep, label = part.partition("=")
            if not sep:
                raise ValueError(f"label {part!r} is not key=value")
            pairs.append((key.strip(), label.strip()))
        items = pairs
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError("labels must be an object or key=value,key=value")
    labels: dict[str, str] = {}
    for key, label in items:
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key):
            raise ValueError(f"label key {key!r} must match {LABEL_KEY.pattern}")
        if not isinstance(label, str) or not LABEL_VALUE.fullmatch(label):
            raise ValueError(f"label value {label!r} of {key} must match {LABEL_VALUE.pattern}")
        if key in labels:
            raise ValueError(f"label {key} is given twice")
        labels[key] = label
    return labels


class Account(BaseModel):
    """A DeepBrain account the operator holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=ACCOUNT_NAME.pattern, min_length=1, max_length=63)]
    app_id: SecretStr
    user_key: SecretStr
    #: Most sessions this service runs on the account at once; None: the vendor's
    #: reported limit alone decides.
    cap: Annotated[int, Field(ge=1, le=100_000)] | None = None
    #: Share of routing among eligible accounts (docs/admission.md "Routing").
    weight: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] = 1.0
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("app_id", "user_key")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> dict[str, str]:
        return parse_labels(value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when the account carries every one of ``labels``."""
        return all(self.labels.get(key) == value for key, value in labels.items())

    def same_secrets(self, other: Account) -> bool:
        return (
            self.app_id.get_secret_value() == other.app_id.get_secret_value()
            and self.user_key.get_secret_value() == other.user_key.get_secret_value()
        )
