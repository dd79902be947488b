"""Settings, read once from ``ORCHESTRATOR_*`` environment variables and passed down.

A bad or missing setting becomes :class:`ConfigError`, whose message is one line
naming the variable; the CLI prints it and exits without a traceback.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.errors import OrchestratorError

ENV_PREFIX = "ORCHESTRATOR_"
DEFAULT_DEEPBRAIN_BASE_URL = "https://ai-streamer.deepbrain.io"
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "xxx", "todo", "placeholder"})
# postgres:// and postgresql:// mean psycopg 3 here (the only driver installed).
DATABASE_SCHEMES = frozenset({"postgresql", "postgres", "postgresql+psycopg"})


def default_state_dir() -> Path:
    return Path.cwd() / ".orchestrator"


class ConfigError(OrchestratorError):
    """A setting is missing or malformed; the message names the variable."""

    shown_as = ""


PositiveSeconds = Annotated[float, Field(gt=0)]
# `orchestrator worker`'s defaults (options, not settings: the chart passes them as arguments).
# Vendor calls are I/O-bound: a start thread waits for the vendor, it does not compute, so a
# host is sized by how many calls may wait at once (docs/operations.md has the figures).
DEFAULT_START_THREADS = 256
# Threads of their own for stops and sweeps when one threads pool serves both queues.
DEFAULT_CONTROL_THREADS = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    state_dir: Path = Field(default_factory=default_state_dir)
    database_url: str = ""
    broker_url: str = ""
    deepbrain_base_url: str = DEFAULT_DEEPBRAIN_BASE_URL
    deepbrain_app_id: SecretStr | None = None
    deepbrain_user_key: SecretStr | None = None
    max_concurrent_sessions: int = Field(default=10, ge=1, le=100_000)
    # A folder of vendor account definitions (a mounted Secret; docs/operations.md "Accounts").
    accounts_dir: Path | None = None
    # Bind a start's tenant to the AMQP user_id property, which RabbitMQ checks against the
    # publishing connection's user (docs/admission.md "Tenants"); off: the message's field.
    tenant_from_user_id: bool = False
    reaper_interval_seconds: PositiveSeconds = 5.0
    reconcile_interval_seconds: PositiveSeconds = 30.0
    # How often beat estimates every waiting request's wait (docs/admission.md "The expected
    # wait"); a request's first estimate comes within one interval of its wait's start.
    wait_estimate_interval_seconds: float = Field(default=10.0, ge=1, le=3600)
    orphan_grace_seconds: float = Field(default=60.0, ge=0)
    start_timeout_seconds: PositiveSeconds = 120.0
    vendor_timeout_seconds: PositiveSeconds = 30.0
    max_session_minutes: int = Field(default=60, ge=1, le=24 * 60)
    stop_retry_seconds: PositiveSeconds = 60.0
    early_stop_retention_seconds: PositiveSeconds = 7 * 86_400.0
    heartbeat_max_age_seconds: PositiveSeconds = 60.0
    db_pool_size: int = Field(default=20, ge=1, le=500)
    # quorum: replicated queues (a RabbitMQ cluster), a delivery limit, native delayed retries;
    # classic: the single-node queues of earlier releases. The embedded broker is always
    # classic (effective_queue_type).
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = Field(default=10, ge=1, le=10_000)
    # Every publish (confirm wait, reconnects, re-publishes) gives up after this: PublishError.
    publish_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # auto: JSON lines unless stderr is a terminal (so JSON in containers, text in a shell).
    log_format: Literal["auto", "text", "json"] = "auto"
    # The numbers of the retry policies (orchestrator/retries.py names them and says where
    # each loop is). A backoff waits, after failure n, between half and all of
    # min(MAX, BACKOFF * 2 ** (n - 1)) seconds.
    vendor_retry_attempts: int = Field(default=4, ge=1, le=20)
    vendor_backoff_seconds: float = Field(default=0.5, gt=0, le=60)
    vendor_backoff_max_seconds: float = Field(default=8.0, gt=0, le=600)
    db_outage_retries: int = Field(default=100, ge=0, le=10_000)
    db_outage_backoff_seconds: float = Field(default=0.5, gt=0, le=60)
    db_outage_backoff_max_seconds: float = Field(default=30.0, gt=0, le=3600)
    record_retry_seconds: float = Field(default=5.0, ge=0, le=300)
    record_backoff_seconds: float = Field(default=0.2, gt=0, le=60)
    record_backoff_max_seconds: float = Field(default=1.0, gt=0, le=60)
    publish_backoff_seconds: float = Field(default=0.25, gt=0, le=60)
    publish_backoff_max_seconds: float = Field(default=2.0, gt=0, le=300)
    stop_backoff_max_seconds: float = Field(default=300.0, gt=0, le=86_400)
    capacity_attempts: int = Field(default=5, ge=1, le=100)

    @field_validator("log_level", "log_format", "queue_type", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value:
            check_database_url(value)
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if value:
            check_broker_url(value)
        return value

    @field_validator("deepbrain_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def reconcile_pass_seconds(self) -> float:
        """How long one reconcile pass may take, however slow the vendor: its interval, but
        at least two vendor requests (the list, and a detail or a stop)."""
        return max(self.reconcile_interval_seconds, 2 * self.vendor_timeout_seconds)

    def check_consistency(self) -> None:
        """Settings that contradict each other: :class:`ConfigError` naming them (one line).

        A vendor request may take ``VENDOR_TIMEOUT_SECONDS`` in all. A session the vendor made
        for a start whose reply is still on its way must not look like an orphan; a start's
        lease (``START_TIMEOUT_SECONDS``, less its margin) must fit a token and a start
        request; a stop's lease (``STOP_RETRY_SECONDS``, less its margin) must fit a stop
        request, or another sweep would stop the same session while the first still waits.
        Every stop holds that lease: the reaper's, a request's, and the one a start owes when a
        stop came during its vendor call.
        """
        timeout = self.vendor_timeout_seconds
        problems = []
        if self.orphan_grace_seconds < timeout:
            problems.append(
                f"{_var('orphan_grace_seconds')} ({self.orphan_grace_seconds:g}) must be at"
                f" least {_var('vendor_timeout_seconds')} ({timeout:g}): a session whose start"
                " reply is still on its way would be stopped as an orphan"
            )
        from orchestrator.retries import vendor_attempts_within_lease

        if vendor_attempts_within_lease(self) < 1:
            problems.append(
                f"{_var('start_timeout_seconds')} ({self.start_timeout_seconds:g}) must fit a"
                f" token and a start request: twice {_var('vendor_timeout_seconds')}"
                f" ({timeout:g}) plus a margin"
            )
        if lease_without_margin(self.stop_retry_seconds) < timeout:
            problems.append(
                f"{_var('stop_retry_seconds')} ({self.stop_retry_seconds:g}) must fit a stop"
                f" request: {_var('vendor_timeout_seconds')} ({timeout:g}) plus a margin"
            )
        problems += self._retry_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _retry_problems(self) -> list[str]:
        """The retry policies' relations: a backoff starts at most at its maximum, and a
        record retry window other than the default must fit before the orphan grace runs out
        (past it the reconciler takes an unrecorded session for an orphan). The default (5 s)
        is cut to what the grace leaves, as it always was."""
        problems = []
        for policy in ("vendor", "db_outage", "record", "publish"):
            base, most = f"{policy}_backoff_seconds", f"{policy}_backoff_max_seconds"
            if getattr(self, base) > getattr(self, most):
                problems.append(
                    f"{_var(base)} ({getattr(self, base):g}) must not exceed {_var(most)}"
                    f" ({getattr(self, most):g})"
                )
        room = max(0.0, self.orphan_grace_seconds - self.vendor_timeout_seconds)
        default = type(self).model_fields["record_retry_seconds"].default
        if self.record_retry_seconds > room and self.record_retry_seconds != default:
            problems.append(
                f"{_var('record_retry_seconds')} ({self.record_retry_seconds:g}) must fit what"
                f" {_var('orphan_grace_seconds')} leaves after {_var('vendor_timeout_seconds')}"
                f" ({room:g} s): a session recorded later would be stopped as an orphan"
            )
        return problems

    @cached_property
    def effective_database_url(self) -> str:
        """The configured URL, or the embedded PostgreSQL of the state directory, started (or
        joined, if another process of this state directory runs it) here."""
        if self.database_url:
            return self.database_url
        # Deferred: importing orchestrator.db loads SQLAlchemy, which the health probe skips.
        from orchestrator.db import embedded

        try:
            return embedded.acquire(self.state_dir)
        except embedded.EmbeddedPostgresError as error:
            raise ConfigError(str(error)) from None

    @cached_property
    def effective_broker_url(self) -> str:
        """The configured URL, or kombu's SQLAlchemy transport on an SQLite file."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.state_dir / 'broker.sqlite3'}"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith(("sqla+", "filesystem:", "memory:"))

    @property
    def effective_queue_type(self) -> Literal["quorum", "classic"]:
        """``queue_type``, except on a broker that is not RabbitMQ (the embedded one):
        quorum queues, delivery limits and native delayed delivery are RabbitMQ's."""
        if self.effective_broker_url.startswith(("amqp", "pyamqp")):
            return self.queue_type
        return "classic"

    def vendor_credentials(self) -> tuple[SecretStr, SecretStr]:
        """The account secrets, or :class:`ConfigError` naming the missing one."""
        creds: list[SecretStr] = []
        for name in ("deepbrain_app_id", "deepbrain_user_key"):
            value: SecretStr | None = getattr(self, name)
            variable = ENV_PREFIX + name.upper()
            if value is None or not value.get_secret_value().strip():
                raise ConfigError(f"{variable} is required to call the DeepBrain API")
            if (
                self.deepbrain_base_url == DEFAULT_DEEPBRAIN_BASE_URL
                and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS
            ):
                raise ConfigError(f"{variable} is a placeholder, not a real DeepBrain credential")
            creds.append(value)
        return creds[0], creds[1]


LEASE_MARGIN_SECONDS = 5.0


def lease_without_margin(lease_seconds: float) -> float:
    """The part of a lease a vendor call may use: the rest (5 s, or a quarter of a shorter
    lease) is left for recording the answer before the lease runs out."""
    return lease_seconds - min(LEASE_MARGIN_SECONDS, lease_seconds / 4)


def _var(field: str) -> str:
    return ENV_PREFIX + field.upper()


def check_database_url(url: str) -> None:
    """ValueError (without the URL, which may hold a password) unless ``url`` is a PostgreSQL
    URL SQLAlchemy can use. Parsed without SQLAlchemy: the health probe loads settings too."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number raises here
        if "://" not in url:
            raise ValueError
    except ValueError:
        raise ValueError("not a URL (postgresql+psycopg://user:password@host:5432/db)") from None
    if parts.scheme not in DATABASE_SCHEMES:
        shown = f"{parts.scheme!r}" if parts.scheme else "none"
        raise ValueError(
            f"scheme {shown} is not PostgreSQL: use postgresql+psycopg://user:password@host:5432/db"
        )
    if not parts.path.strip("/") and "host=" not in parts.query:
        raise ValueError("names no database (postgresql+psycopg://user:password@host:5432/db)")


def check_broker_url(url: str) -> None:
    """ValueError (without the URL) unless every URL of ``url`` (kombu's failover list:
    ``amqp://a//;amqp://b//``) names a transport kombu knows and has a valid port."""
    from kombu.transport import TRANSPORT_ALIASES

    for number, part in enumerate((p.strip() for p in url.split(";")), 1):
        where = f"URL {number} of the list: " if ";" in url else ""
        try:
            parts = urlsplit(part)
            _ = parts.port
        except ValueError:
            raise ValueError(f"{where}not a URL (amqp://user:password@host:5672/vhost)") from None
        transport = parts.scheme.split("+", 1)[0]
        if not part or "://" not in part or transport not in TRANSPORT_ALIASES:
            shown = f"{transport!r}" if transport else "none"
            raise ValueError(
                f"{where}unknown transport {shown} (amqp://user:password@host:5672/vhost)"
            )


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    variable = ENV_PREFIX + field.upper()
    value = first.get("input")
    shown = "" if "secret" in field or "key" in field or "url" in field else f" (got {value!r})"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{variable}: {message}{shown}"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; overrides win (the demo and tests use them)."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
