"""Settings: defaults, and one readable line naming the variable when something is wrong."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_settings


def test_defaults_are_embedded_and_match_the_design(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.database_url == ""  # the embedded PostgreSQL: tests/test_embedded_postgres.py
    assert settings.effective_broker_url.startswith("sqla+sqlite")
    assert settings.deepbrain_base_url == "https://ai-streamer.deepbrain.io"
    assert (settings.max_concurrent_sessions, settings.max_session_minutes) == (10, 60)
    assert (settings.reaper_interval_seconds, settings.reconcile_interval_seconds) == (5, 30)
    assert (settings.orphan_grace_seconds, settings.start_timeout_seconds) == (60, 120)
    assert settings.vendor_timeout_seconds == 30
    assert (settings.queue_type, settings.delivery_limit) == ("quorum", 10)
    assert settings.effective_queue_type == "classic"  # the embedded broker has no quorum


def test_queue_type_is_quorum_or_classic_and_only_rabbitmq_is_quorum() -> None:
    rabbit = "amqp://u:p@mq-a//;amqp://u:p@mq-b//"
    assert load_settings(broker_url=rabbit).effective_queue_type == "quorum"
    classic = load_settings(broker_url=rabbit, queue_type=" Classic ")
    assert (classic.queue_type, classic.effective_queue_type) == ("classic", "classic")
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_QUEUE_TYPE: Input should be 'quorum'"):
        load_settings(queue_type="mirrored")
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_DELIVERY_LIMIT: "):
        load_settings(delivery_limit=0)


def test_the_wait_estimate_interval_is_between_a_second_and_an_hour() -> None:
    assert load_settings().wait_estimate_interval_seconds == 10
    assert load_settings(wait_estimate_interval_seconds=3600).wait_estimate_interval_seconds == 3600
    for bad in (0.5, 3601, 0):
        with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_WAIT_ESTIMATE_INTERVAL_SECONDS: "):
            load_settings(wait_estimate_interval_seconds=bad)


def test_a_failover_list_reaches_kombu_as_one_list_without_spaces() -> None:
    from kombu import Connection

    from orchestrator.publishing import broker_url

    settings = load_settings(broker_url="amqp://u:p@mq-a:5672/v ; amqp://u:p@mq-b:5673/v")
    assert broker_url(settings) == "amqp://u:p@mq-a:5672/v;amqp://u:p@mq-b:5673/v"
    connection = Connection(broker_url(settings))
    assert connection.alt == ["amqp://u:p@mq-a:5672/v", "amqp://u:p@mq-b:5673/v"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORCHESTRATOR_MAX_CONCURRENT_SESSIONS", "lots"),
        ("ORCHESTRATOR_MAX_CONCURRENT_SESSIONS", "0"),
        ("ORCHESTRATOR_REAPER_INTERVAL_SECONDS", "-1"),
        ("ORCHESTRATOR_DEEPBRAIN_BASE_URL", "ftp://x"),
        ("ORCHESTRATOR_MAX_SESSION_MINUTES", "1.5"),
    ],
)
def test_malformed_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith(variable)
    assert "\n" not in message


def test_missing_vendor_credentials_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCHESTRATOR_DEEPBRAIN_APP_ID", raising=False)
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_DEEPBRAIN_APP_ID is required"):
        load_settings().vendor_credentials()


def test_placeholder_secret_is_refused_for_the_real_vendor() -> None:
    settings = load_settings(deepbrain_app_id="real-app", deepbrain_user_key="changeme")
    with pytest.raises(ConfigError, match="ORCHESTRATOR_DEEPBRAIN_USER_KEY is a placeholder"):
        settings.vendor_credentials()


def test_cli_prints_one_line_and_no_traceback() -> None:
    result = CliRunner().invoke(
        main, ["sessions"], env={"ORCHESTRATOR_MAX_CONCURRENT_SESSIONS": "lots"}
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(
        "Error: ORCHESTRATOR_MAX_CONCURRENT_SESSIONS"
    )
    assert "Traceback" not in result.output


def test_worker_without_credentials_fails_with_one_line(tmp_path: object) -> None:
    result = CliRunner().invoke(
        main,
        ["worker"],
        env={"ORCHESTRATOR_DEEPBRAIN_APP_ID": "", "ORCHESTRATOR_DEEPBRAIN_USER_KEY": ""},
    )
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == "Error: ORCHESTRATOR_DEEPBRAIN_APP_ID is required to call the DeepBrain API"
    )


def test_log_level_and_format_in_any_case() -> None:
    settings = load_settings(log_level="debug", log_format="JSON")
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert load_settings(log_level=" Warning ").log_level == "WARNING"
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_LOG_LEVEL: Input should be 'DEBUG'"):
        load_settings(log_level="loud")
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_LOG_FORMAT: Input should be 'auto'"):
        load_settings(log_format="yaml")


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672//",
        "amqps://u:p@mq.example.com:5671/prod",
        "amqp://u:p@mq-a:5672/v;amqp://u:p@mq-b:5672/v",  # kombu's failover list
        "amqp://u:p@mq-a//; amqp://u:p@mq-b//",
        "sqla+sqlite:////tmp/broker.sqlite3",
    ],
)
def test_broker_urls_kombu_accepts_are_accepted(url: str) -> None:
    assert load_settings(broker_url=url).broker_url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("foo://host//", "unknown transport 'foo'"),
        ("rabbitmq.internal:5672", "unknown transport"),
        ("amqp://u:secret-pw@mq-a//;nope://u:secret-pw@mq-b//", "URL 2 of the list: unknown"),
        ("amqp://u:secret-pw@mq:port//", "not a URL"),
    ],
)
def test_malformed_broker_url_names_the_variable_not_the_password(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(broker_url=url)
    assert str(error.value).startswith(f"ORCHESTRATOR_BROKER_URL: {why}")
    assert "secret-pw" not in str(error.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("u:secret-pw@db/orch", "not a URL"),
        ("mysql://u:secret-pw@db/orch", "scheme 'mysql' is not PostgreSQL"),
        ("postgresql://u:secret-pw@db:port/orch", "not a URL"),
        ("postgresql://u:secret-pw@db:5432", "names no database"),
    ],
)
def test_malformed_database_url_names_the_variable_not_the_password(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(database_url=url)
    assert str(error.value).startswith(f"ORCHESTRATOR_DATABASE_URL: {why}")
    assert "secret-pw" not in str(error.value)
    for good in (
        "postgresql+psycopg://u:p@db:5432/orch",
        "postgres://u@db/orch",
        "postgresql+psycopg://postgres@/postgres?host=/tmp/state/postgres&port=5432",
    ):
        assert load_settings(database_url=good).database_url == good
