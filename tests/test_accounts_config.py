"""Account definitions: a mounted folder, ``ORCHESTRATOR_ACCOUNT_<NAME>_<FIELD>`` variables
and today's single-account settings as ``default``; reload on change; one-line errors that
name the file or variable and never a secret."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from orchestrator.accounts import (
    AccountCatalog,
    AccountsError,
    SingleAccount,
    load_accounts,
    parse_labels,
)
from orchestrator.config import ConfigError

SIM_URL = "http://127.0.0.1:8800"
REAL_URL = "https://ai-streamer.deepbrain.io"
NO_SINGLE = SingleAccount(app_id=None, user_key=None, max_concurrent_sessions=10)
SECRETS = ("s3cret-app-eu", "s3cret-key-eu", "s3cret-app-us", "s3cret-key-us")


def single(
    app_id: str = "s3cret-app-default", user_key: str = "s3cret-key-default"
) -> SingleAccount:
    return SingleAccount(SecretStr(app_id), SecretStr(user_key), max_concurrent_sessions=7)


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def load(
    folder: Path | None = None, env: dict[str, str] | None = None, **kw: Any
) -> dict[str, Any]:
    return load_accounts(folder, env or {}, kw.pop("single", NO_SINGLE), kw.pop("url", SIM_URL))


def failure(folder: Path | None = None, env: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(AccountsError) as error:
        load(folder, env, **kw)
    message = str(error.value)
    assert "\n" not in message
    for secret in (*SECRETS, "changeme", "s3cret-app-default"):
        assert secret not in message, message
    assert isinstance(error.value, ConfigError)  # the CLI prints it as one line
    return message


def test_folder_files_and_a_list_file(tmp_path: Path) -> None:
    write(
        tmp_path / "eu.json",
        {
            "app_id": "s3cret-app-eu",
            "user_key": "s3cret-key-eu",
            "cap": 20,
            "weight": 2,
            "labels": {"region": "eu", "tier": "gold"},
        },
    )
    write(
        tmp_path / "accounts.json",
        [
            {
                "name": "us-east",
                "app_id": "s3cret-app-us",
                "user_key": "s3cret-key-us",
                "labels": "region=us",
            }
        ],
    )
    write(tmp_path / ".hidden.tmp", "ignored")  # the mount's own ..data links are hidden
    accounts = load(tmp_path)
    assert list(accounts) == ["eu", "us-east"]
    eu, us = accounts["eu"], accounts["us-east"]
    assert (eu.cap, eu.weight, eu.labels) == (20, 2.0, {"region": "eu", "tier": "gold"})
    assert eu.app_id.get_secret_value() == "s3cret-app-eu"
    assert (us.cap, us.weight, us.labels) == (None, 1.0, {"region": "us"})
    assert eu.matches({"region": "eu"}) and not eu.matches({"region": "us"})
    for shown in (repr(eu), str(eu), eu.model_dump_json()):
        assert "s3cret" not in shown


def test_environment_scheme(tmp_path: Path) -> None:
    env = {
        "ORCHESTRATOR_ACCOUNT_EU_WEST_APP_ID": "s3cret-app-eu",
        "ORCHESTRATOR_ACCOUNT_EU_WEST_USER_KEY": "s3cret-key-eu",
        "ORCHESTRATOR_ACCOUNT_EU_WEST_CAP": "3",
        "ORCHESTRATOR_ACCOUNT_EU_WEST_WEIGHT": "0.5",
        "ORCHESTRATOR_ACCOUNT_EU_WEST_LABELS": "region=eu, plan=pro",
        "ORCHESTRATOR_ACCOUNTS_DIR": "/not/an/account",  # another setting, not an account
        "ORCHESTRATOR_MAX_CONCURRENT_SESSIONS": "4",
    }
    accounts = load(env=env)
    assert list(accounts) == ["eu-west"]
    eu = accounts["eu-west"]
    assert (eu.cap, eu.weight, eu.labels) == (3, 0.5, {"region": "eu", "plan": "pro"})
    write(tmp_path / "us.json", {"app_id": "s3cret-app-us", "user_key": "s3cret-key-us"})
    assert list(load(tmp_path, env)) == ["eu-west", "us"]


def test_metadata_variables_complete_an_account_whose_keys_are_in_the_folder(
    tmp_path: Path,
) -> None:
    # The chart's way: keys in the mounted Secret, cap/weight/labels in its ConfigMap.
    write(tmp_path / "eu.json", {"app_id": "s3cret-app-eu", "user_key": "s3cret-key-eu"})
    env = {
        "ORCHESTRATOR_ACCOUNT_EU_CAP": "30",
        "ORCHESTRATOR_ACCOUNT_EU_WEIGHT": "2",
        "ORCHESTRATOR_ACCOUNT_EU_LABELS": "region=eu",
    }
    eu = load(tmp_path, env)["eu"]
    assert (eu.cap, eu.weight, eu.labels) == (30, 2.0, {"region": "eu"})
    assert eu.user_key.get_secret_value() == "s3cret-key-eu"
    # today's default account takes a weight and labels too (its cap is its own setting)
    default = load(env={"ORCHESTRATOR_ACCOUNT_DEFAULT_LABELS": "tier=gold"}, single=single())
    assert (default["default"].cap, default["default"].labels) == (7, {"tier": "gold"})

    for extra, expected in (
        ({"ORCHESTRATOR_ACCOUNT_US_CAP": "3"}, "ORCHESTRATOR_ACCOUNT_US_*: account us has no keys"),
        ({"ORCHESTRATOR_ACCOUNT_EU_CAP": "0"}, "ORCHESTRATOR_ACCOUNT_EU_CAP: "),
        ({"ORCHESTRATOR_ACCOUNT_DEFAULT_CAP": "3"}, "cap of account default is also set by"),
    ):
        message = failure(tmp_path, {**env, **extra}, single=single())
        assert expected in message, message
        assert "s3cret" not in message
    write(tmp_path / "eu.json", {"app_id": "s3cret-app-eu", "user_key": "k", "cap": 5})
    message = failure(tmp_path, env)
    assert "cap of account eu is also set by" in message and str(tmp_path) in message


def test_single_account_settings_are_the_default_account() -> None:
    accounts = load(single=single())
    assert list(accounts) == ["default"]
    assert accounts["default"].cap == 7
    assert accounts["default"].user_key.get_secret_value() == "s3cret-key-default"
    # Alongside other accounts while they are set (their live sessions need the key).
    env = {"ORCHESTRATOR_ACCOUNT_EU_APP_ID": "a", "ORCHESTRATOR_ACCOUNT_EU_USER_KEY": "k"}
    assert list(load(env=env, single=single())) == ["default", "eu"]
    assert list(load(env=env)) == ["eu"]


@pytest.mark.parametrize(
    ("files", "env", "expected"),
    [
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": "k", "region": "eu"}},
            {},
            "eu.json: region: unknown field",
        ),
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": "k", "labels": {"Region": "eu"}}},
            {},
            "eu.json: labels: label key 'Region' must match",
        ),
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": "k", "labels": "region"}},
            {},
            "eu.json: labels: label 'region' is not key=value",
        ),
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": "k", "labels": {"r": "a b"}}},
            {},
            "eu.json: labels: label value 'a b' of r must match",
        ),
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": "k", "cap": 0}},
            {},
            "eu.json: cap: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": "k", "weight": 0}},
            {},
            "eu.json: weight: Input should be greater than 0",
        ),
        ({"eu.json": {"app_id": "s3cret-app-eu"}}, {}, "eu.json: user_key: Field required"),
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": " "}},
            {},
            "eu.json: user_key: must not be empty",
        ),
        (
            {"eu.json": {"name": "us", "app_id": "s3cret-app-eu", "user_key": "k"}},
            {},
            "eu.json: name: must equal the file's name 'eu'",
        ),
        (
            {"EU.json": {"app_id": "s3cret-app-eu", "user_key": "k"}},
            {},
            "EU.json: file name must be an account name",
        ),
        ({"eu.yaml": "app_id: x"}, {}, "eu.yaml: not an account file"),
        ({"eu.json": '{"app_id": "s3cret-app-eu",'}, {}, "eu.json: not valid JSON (line 1)"),
        ({"eu.json": ["s3cret-app-eu"]}, {}, "eu.json: must be an object"),
        (
            {"accounts.json": [{"app_id": "s3cret-app-eu", "user_key": "k"}]},
            {},
            "accounts.json (account 1): name: required",
        ),
        (
            {
                "eu.json": {"app_id": "s3cret-app-eu", "user_key": "s3cret-key-eu"},
                "accounts.json": [
                    {"name": "eu", "app_id": "s3cret-app-us", "user_key": "s3cret-key-us"}
                ],
            },
            {},
            "eu.json: account eu is also defined by",
        ),
        (
            {"eu.json": {"app_id": "s3cret-app-eu", "user_key": "s3cret-key-eu"}},
            {
                "ORCHESTRATOR_ACCOUNT_EU_APP_ID": "s3cret-app-us",
                "ORCHESTRATOR_ACCOUNT_EU_USER_KEY": "s3cret-key-us",
            },
            "ORCHESTRATOR_ACCOUNT_EU_*: account eu is also defined by",
        ),
        (
            {},
            {"ORCHESTRATOR_ACCOUNT_EU_APP_ID": "s3cret-app-eu"},
            "ORCHESTRATOR_ACCOUNT_EU_USER_KEY: required (account eu)",
        ),
        (
            {},
            {"ORCHESTRATOR_ACCOUNT_EU_REGION": "eu"},
            "ORCHESTRATOR_ACCOUNT_EU_REGION: not ORCHESTRATOR_ACCOUNT_<NAME>_<FIELD>",
        ),
        (
            {},
            {
                "ORCHESTRATOR_ACCOUNT_EU_APP_ID": "s3cret-app-eu",
                "ORCHESTRATOR_ACCOUNT_EU_USER_KEY": "s3cret-key-eu",
                "ORCHESTRATOR_ACCOUNT_EU_CAP": "many",
            },
            "ORCHESTRATOR_ACCOUNT_EU_CAP: Input should be a valid integer",
        ),
        (
            {},
            {
                "ORCHESTRATOR_ACCOUNT_EU_APP_ID": "s3cret-app-eu",
                "ORCHESTRATOR_ACCOUNT_EU_USER_KEY": "s3cret-key-eu",
                "ORCHESTRATOR_ACCOUNT_EU_LABELS": "region=e u",
            },
            "ORCHESTRATOR_ACCOUNT_EU_LABELS: label value",
        ),
        ({}, {}, "no DeepBrain account: set ORCHESTRATOR_DEEPBRAIN_APP_ID"),
    ],
)
def test_bad_definitions_are_one_line_naming_where(
    tmp_path: Path, files: dict[str, Any], env: dict[str, str], expected: str
) -> None:
    for name, data in files.items():
        write(tmp_path / name, data)
    message = failure(tmp_path, env)
    assert expected in message, message
    if files:
        assert str(tmp_path) in message


def test_default_defined_twice_and_half_set_single_settings(tmp_path: Path) -> None:
    write(tmp_path / "default.json", {"app_id": "s3cret-app-eu", "user_key": "s3cret-key-eu"})
    message = failure(tmp_path, single=single())
    assert "account default is also defined by" in message
    half = SingleAccount(SecretStr("s3cret-app-default"), None, 10)
    assert "ORCHESTRATOR_DEEPBRAIN_USER_KEY is required" in failure(single=half)


def test_placeholders_are_refused_for_the_real_vendor_only(tmp_path: Path) -> None:
    write(tmp_path / "eu.json", {"app_id": "s3cret-app-eu", "user_key": "changeme"})
    message = failure(tmp_path, url=REAL_URL)
    where = tmp_path / "eu.json"
    assert message == (
        f"{where}: user_key of account eu is a placeholder, not a real DeepBrain credential"
    )
    assert "placeholder" in failure(single=single(app_id="TODO"), url=REAL_URL + "/")
    assert list(load(tmp_path, url=SIM_URL)) == ["eu"]


def test_parse_labels() -> None:
    assert parse_labels("") == {}
    assert parse_labels(" a=1 ,b.c=x-y ") == {"a": "1", "b.c": "x-y"}
    assert parse_labels({"region": "eu"}) == {"region": "eu"}
    with pytest.raises(ValueError, match="given twice"):
        parse_labels("a=1,a=2")
    with pytest.raises(ValueError, match="must be an object"):
        parse_labels(["a=1"])


# -- reload on change ------------------------------------------------------------------


def test_a_rotated_key_is_picked_up_and_nothing_else_reloads(tmp_path: Path) -> None:
    eu = write(tmp_path / "eu.json", {"app_id": "s3cret-app-eu", "user_key": "old-key"})
    catalog = AccountCatalog(NO_SINGLE, folder=tmp_path, environ={}, base_url=SIM_URL)
    assert catalog.get("eu").user_key.get_secret_value() == "old-key"
    assert catalog.refresh() is False
    # Replaced the way a writer does it atomically: a new file renamed over the old one.
    write(tmp_path / ".eu.json.new", {"app_id": "s3cret-app-eu", "user_key": "new-key"})
    os.replace(tmp_path / ".eu.json.new", eu)
    assert catalog.refresh() is True
    assert catalog.get("eu").user_key.get_secret_value() == "new-key"
    assert catalog.refresh() is False
    # A new account file appears.
    write(tmp_path / "us.json", {"app_id": "s3cret-app-us", "user_key": "s3cret-key-us"})
    assert catalog.refresh() is True
    assert list(catalog.accounts()) == ["eu", "us"]


def test_a_kubernetes_secret_mount_rotates_through_its_data_link(tmp_path: Path) -> None:
    """kubelet writes a new timestamped folder and swaps the ``..data`` link at once."""
    mount = tmp_path / "accounts"
    mount.mkdir()

    def publish(version: str, key: str) -> None:
        payload = mount / f"..{version}"
        payload.mkdir()
        write(payload / "eu.json", {"app_id": "s3cret-app-eu", "user_key": key})
        (mount / "..data_tmp").symlink_to(payload.name)
        os.replace(mount / "..data_tmp", mount / "..data")

    publish("2026_12_06_01", "key-one")
    (mount / "eu.json").symlink_to("..data/eu.json")
    catalog = AccountCatalog(NO_SINGLE, folder=mount, environ={}, base_url=SIM_URL)
    assert catalog.get("eu").user_key.get_secret_value() == "key-one"
    publish("2026_12_06_02", "key-two")
    assert catalog.refresh() is True
    assert catalog.get("eu").user_key.get_secret_value() == "key-two"


def test_a_bad_rotation_keeps_the_last_good_accounts(tmp_path: Path) -> None:
    eu = write(tmp_path / "eu.json", {"app_id": "s3cret-app-eu", "user_key": "s3cret-key-eu"})
    catalog = AccountCatalog(NO_SINGLE, folder=tmp_path, environ={}, base_url=SIM_URL)
    catalog.refresh()
    write(tmp_path / ".new", {"app_id": "s3cret-app-eu", "user_key": "s3cret-key-eu", "x": 1})
    os.replace(tmp_path / ".new", eu)
    with pytest.raises(AccountsError, match=r"eu\.json: x: unknown field"):
        catalog.refresh()
    assert catalog.last_error is not None
    assert catalog.refresh() is False  # reported once, the last good accounts stay
    assert catalog.get("eu").user_key.get_secret_value() == "s3cret-key-eu"
    write(tmp_path / ".new", {"app_id": "s3cret-app-eu", "user_key": "s3cret-key-2"})
    os.replace(tmp_path / ".new", eu)
    assert catalog.refresh() is True
    assert catalog.last_error is None
    assert catalog.get("eu").user_key.get_secret_value() == "s3cret-key-2"


def test_environment_changes_and_a_missing_folder(tmp_path: Path) -> None:
    env = {"ORCHESTRATOR_ACCOUNT_EU_APP_ID": "a", "ORCHESTRATOR_ACCOUNT_EU_USER_KEY": "k1"}
    catalog = AccountCatalog(single(), environ=env, base_url=SIM_URL)
    assert list(catalog.accounts()) == ["default", "eu"]
    env["ORCHESTRATOR_ACCOUNT_EU_USER_KEY"] = "k2"
    assert catalog.refresh() is True
    assert catalog.get("eu").user_key.get_secret_value() == "k2"
    with pytest.raises(AccountsError, match="no account named 'us'"):
        catalog.get("us")
    missing = AccountCatalog(NO_SINGLE, folder=tmp_path / "nope", environ={}, base_url=SIM_URL)
    with pytest.raises(AccountsError, match="nope: accounts folder does not exist"):
        missing.accounts()
    with pytest.raises(AccountsError, match="does not exist"):  # still bad: raised again
        missing.accounts()
