"""The sender's and the CLI's webhook settings (``ORCHESTRATOR_WEBHOOK_*``), read once and
passed down; a bad value is one line naming the variable (:class:`ConfigError`)."""

from __future__ import annotations

import ipaddress
from functools import cached_property

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.config import ConfigError

PREFIX = "ORCHESTRATOR_WEBHOOK_"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # A Fernet key (`orchestrator webhooks key` prints a new one): the signing secrets are
    # encrypted with it in the database. Required by add, rotate and send.
    secret_key: SecretStr | None = None
    # Comma-separated host names (plain http allowed to them) and networks in CIDR form
    # (addresses allowed although private, loopback or link-local): on-premise receivers.
    allow: str = ""
    timeout_seconds: float = Field(default=15.0, gt=0, le=120)  # one attempt, in total
    concurrency: int = Field(default=64, ge=1, le=1000)  # attempts at once, all endpoints
    per_endpoint_concurrency: int = Field(default=16, ge=1, le=100)
    disable_after_seconds: float = Field(default=5 * 86_400.0, gt=0)  # failing this long
    rotation_grace_seconds: float = Field(default=86_400.0, ge=0)  # the old secret still signs
    poll_interval_seconds: float = Field(default=0.2, gt=0, le=60)

    @cached_property
    def allowed_hosts(self) -> frozenset[str]:
        return frozenset(
            e.lower() for e in self._entries() if not _is_network(e) and e.lower() != "*"
        )

    @cached_property
    def allowed_networks(self) -> tuple[Network, ...]:
        return tuple(
            ipaddress.ip_network(e, strict=False) for e in self._entries() if _is_network(e)
        )

    def _entries(self) -> list[str]:
        return [e.strip() for e in self.allow.split(",") if e.strip()]


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def load_webhook_settings(**overrides: object) -> WebhookSettings:
    """The environment's webhook settings; ``overrides`` win (tests)."""
    try:
        return WebhookSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        first = error.errors()[0]
        variable = PREFIX + "_".join(str(p) for p in first["loc"]).upper()
        raise ConfigError(f"{variable}: {first['msg']}") from None
