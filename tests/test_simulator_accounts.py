"""The simulator serving several vendor accounts, exercised with plain httpx.

Each account has its own appId/userKey, cap, session list and faults; a token is bound to
the account whose key minted it, and a session of another account is "not found".
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.simulator import (
    SimulatorAccount,
    SimulatorConfig,
    SimulatorServer,
    load_accounts_file,
)

API = "/api/v2/sessions"
CAPS = {"a": 2, "b": 3, "c": 5}


def keys(name: str) -> tuple[str, str]:
    return f"app-{name}", f"key-{name}"


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    accounts = [SimulatorAccount(n, *keys(n), max_concurrent_sessions=c) for n, c in CAPS.items()]
    with SimulatorServer(SimulatorConfig(accounts=accounts, seed=1)) as server:
        yield server


@pytest.fixture
def client(sim: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=5.0) as c:
        yield c


def token_reply(client: httpx.Client, name: str) -> httpx.Response:
    app_id, user_key = keys(name)
    return client.post(f"{API}/token", json={"appId": app_id, "userKey": user_key})


def token(client: httpx.Client, name: str) -> str:
    r = token_reply(client, name)
    assert r.status_code == 200, r.text
    value: str = r.json()["data"]["session_token"]
    return value


def start(client: httpx.Client, tok: str) -> httpx.Response:
    return client.post(
        f"{API}/start", json={"avatar_id": "x"}, headers={"Authorization": f"Bearer {tok}"}
    )


def started(client: httpx.Client, name: str) -> dict[str, Any]:
    r = start(client, token(client, name))
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def key(name: str) -> dict[str, str]:
    return {"STUDIO-API-KEY": keys(name)[1]}


def listed(client: httpx.Client, name: str) -> list[str]:
    r = client.get(API, params={"type": "active", "page_size": 100}, headers=key(name))
    assert r.status_code == 200, r.text
    return [row["sessionId"] for row in r.json()["data"]["results"]]


def error_of(r: httpx.Response) -> tuple[int, int]:
    return r.status_code, r.json()["code"]


def test_each_account_sees_only_its_own_sessions(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    a1, a2 = started(client, "a")["session_id"], started(client, "a")["session_id"]
    b1 = started(client, "b")["session_id"]

    assert sorted(listed(client, "a")) == sorted([a1, a2])
    assert listed(client, "b") == [b1]
    assert listed(client, "c") == []
    # Another account's session is "not found" to detail, stop, ping and talk.
    assert error_of(client.get(f"{API}/{b1}", headers=key("a"))) == (404, 4040)
    stop = client.post(f"{API}/stop", json={"session_id": b1}, headers=key("a"))
    assert error_of(stop) == (404, 4040)
    a_token = {"Authorization": f"Bearer {token(client, 'a')}"}
    assert error_of(client.post(f"{API}/{b1}/ping", headers=a_token)) == (404, 4040)
    talk = client.post(f"{API}/{b1}/talk", json={"message": "hi"}, headers=a_token)
    assert error_of(talk) == (404, 4040)
    assert client.get(f"{API}/{b1}", headers=key("b")).json()["data"]["end_at"] is None

    # The simulator's record names the account of every session.
    assert {s["session_id"]: s["account"] for s in sim.sessions()} == {
        a1: "a",
        a2: "a",
        b1: "b",
    }
    assert [s["session_id"] for s in sim.sessions(account="b")] == [b1]
    assert sim.sessions(account="b")[0]["stop_calls"] == 0  # a's stop did not reach it
    stats = sim.stats()["accounts"]
    assert stats["a"]["sessions"] == {"active": 2, "max_active": 2, "limit": 2}
    assert stats["b"]["calls"]["start"] == 1
    assert stats["b"]["statuses"]["detail"] == {"200": 1}


def test_each_account_has_its_own_cap_and_the_vendor_limit_code(client: httpx.Client) -> None:
    assert started(client, "a")["max_session_numbers"] == 2
    started(client, "a")
    full = start(client, token(client, "a"))
    assert error_of(full) == (403, 4030)
    assert "limit" in full.json()["message"]
    # The other accounts' slots are untouched by a's.
    for _ in range(3):
        assert started(client, "b")["max_session_numbers"] == 3
    assert error_of(start(client, token(client, "b"))) == (403, 4030)
    assert started(client, "c")["max_session_numbers"] == 5
    # A stop frees a slot on its own account only.
    sid = listed(client, "a")[0]
    assert client.post(f"{API}/stop", json={"session_id": sid}, headers=key("a")).is_success
    assert started(client, "a")["session_id"] not in listed(client, "b")


def test_a_refused_key_refuses_that_account_only(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    b_token = token(client, "b")
    b_session = started(client, "b")["session_id"]
    sim.configure_account("b", refuse_key=True)

    # 401 / 4010 on every call of b, distinct from the 403 / 4030 of a full account.
    assert error_of(token_reply(client, "b")) == (401, 4010)
    assert error_of(start(client, b_token)) == (401, 4010)
    assert error_of(client.get(API, headers=key("b"))) == (401, 4010)
    assert error_of(client.get(f"{API}/{b_session}", headers=key("b"))) == (401, 4010)
    stop = client.post(f"{API}/stop", json={"session_id": b_session}, headers=key("b"))
    assert error_of(stop) == (401, 4010)
    # a and c are served as before.
    started(client, "a")
    assert listed(client, "c") == []

    sim.configure_account("b", refuse_key=False)
    assert listed(client, "b") == [b_session]
    assert start(client, b_token).status_code == 200


def test_server_errors_on_one_account_at_run_time(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    c_token = token(client, "c")
    reply = client.post("/_sim/accounts/c/config", json={"server_errors": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["server_errors"] is True

    assert error_of(token_reply(client, "c")) == (500, 5000)
    assert error_of(start(client, c_token)) == (500, 5000)
    assert error_of(client.get(API, headers=key("c"))) == (500, 5000)
    assert sim.sessions(account="c") == []
    started(client, "a")
    started(client, "b")

    sim.configure_account("c", server_errors=False)
    assert start(client, c_token).status_code == 200
    assert len(listed(client, "c")) == 1
    assert sim.stats()["accounts"]["c"]["statuses"]["start"] == {"500": 1, "200": 1}


def test_top_level_keys_and_cap_are_refused_with_accounts(sim: SimulatorServer) -> None:
    with pytest.raises(ValueError, match="max_concurrent_sessions: set per account"):
        sim.configure(max_concurrent_sessions=1)
    with pytest.raises(ValueError, match="app_id, user_key: set per account"):
        SimulatorConfig.from_options(app_id="x", user_key="y", accounts=[keys_account("eu")])
    assert sim.config.account_list()[0].max_concurrent_sessions == 2


def keys_account(name: str) -> SimulatorAccount:
    return SimulatorAccount(name, *keys(name))


def test_latency_and_failure_rates_per_account(sim: SimulatorServer, client: httpx.Client) -> None:
    sim.configure_account("a", latency_seconds=0.4, failure_rate={"list": 1.0})
    began = time.monotonic()
    assert error_of(client.get(API, headers=key("a"))) == (500, 5000)
    assert time.monotonic() - began >= 0.4
    began = time.monotonic()
    assert listed(client, "b") == []
    assert time.monotonic() - began < 0.3
    # Unset per-account values take the simulator-wide ones.
    sim.configure(endpoint_latency={"detail": 0.3})
    began = time.monotonic()
    assert error_of(client.get(f"{API}/nope", headers=key("b"))) == (404, 4040)
    assert time.monotonic() - began >= 0.3


def test_scripted_fault_for_one_account(sim: SimulatorServer, client: httpx.Client) -> None:
    sim.push_fault({"endpoint": "start", "status": 429, "retry_after": "2", "account": "a"})
    started(client, "b")  # b's start does not take a's fault
    r = start(client, token(client, "a"))
    assert error_of(r) == (429, 4290)
    assert r.headers["Retry-After"] == "2"
    started(client, "a")
    bad = client.post("/_sim/faults", json={"endpoint": "start", "status": 500, "account": "zz"})
    assert bad.status_code == 400
    assert "zz" in bad.json()["error"]


def test_a_token_is_bound_to_its_account(sim: SimulatorServer, client: httpx.Client) -> None:
    a_token = token(client, "a")
    session = started(client, "a")["session_id"]
    assert sim.sessions()[0]["account"] == "a"
    # Wrong pairs of appId and userKey are refused, even when each is some account's.
    mixed = client.post(f"{API}/token", json={"appId": "app-a", "userKey": "key-b"})
    assert error_of(mixed) == (401, 4010)
    # A rotated appId invalidates the account's tokens; revoking one account's tokens
    # leaves the others' valid.
    b_token = token(client, "b")
    sim.revoke_tokens("a")
    assert error_of(start(client, a_token)) == (401, 4010)
    assert start(client, b_token).status_code == 200
    sim.configure_account("b", app_id="app-b-rotated")
    assert error_of(start(client, b_token)) == (401, 4010)
    assert listed(client, "a") == [session]


def test_accounts_over_the_admin_api(client: httpx.Client) -> None:
    accounts = client.get("/_sim/accounts").json()
    assert [(a["name"], a["max_concurrent_sessions"], a["active"]) for a in accounts] == [
        ("a", 2, 0),
        ("b", 3, 0),
        ("c", 5, 0),
    ]
    assert client.post("/_sim/accounts/zz/config", json={"refuse_key": True}).status_code == 404
    bad = client.post("/_sim/accounts/a/config", json={"bogus": 1})
    assert bad.status_code == 400
    assert "bogus" in bad.json()["error"]
    assert client.post("/_sim/accounts/a/config", json={"max_concurrent_sessions": 1}).is_success
    started(client, "a")
    assert error_of(start(client, token(client, "a"))) == (403, 4030)
    replaced = client.post(
        "/_sim/config", json={"accounts": [{"name": "d", "app_id": "app-d", "user_key": "key-d"}]}
    )
    assert replaced.status_code == 200, replaced.text
    assert [a["name"] for a in replaced.json()["accounts"]] == ["d"]


def test_one_account_configuration_is_the_default_account() -> None:
    with (
        SimulatorServer(SimulatorConfig(max_concurrent_sessions=1)) as sim,
        httpx.Client(base_url=sim.base_url, timeout=5.0) as client,
    ):
        assert [a.name for a in sim.accounts()] == ["default"]
        r = client.post(f"{API}/token", json={"appId": "demo-app-id", "userKey": "demo-user-key"})
        tok = r.json()["data"]["session_token"]
        assert start(client, tok).status_code == 200
        assert sim.sessions()[0]["account"] == "default"
        # The default account's runtime changes are the top-level knobs.
        sim.configure_account("default", max_concurrent_sessions=2, server_errors=True)
        assert sim.config.max_concurrent_sessions == 2
        assert error_of(start(client, tok)) == (500, 5000)
        sim.configure(server_errors=False)
        assert start(client, tok).status_code == 200
        with pytest.raises(ValueError, match="no account named 'a'"):
            sim.configure_account("a", refuse_key=True)


@pytest.mark.parametrize(
    ("accounts", "message"),
    [
        ([{"name": "A", "app_id": "x", "user_key": "y"}], "must match"),
        ([{"name": "a", "app_id": "x"}], "needs user_key"),
        ([{"name": "a", "app_id": "x", "user_key": "y", "cap": 1}], "unknown account field"),
        (
            [
                {"name": "a", "app_id": "x", "user_key": "y"},
                {"name": "a", "app_id": "z", "user_key": "w"},
            ],
            "share the name 'a'",
        ),
        (
            [
                {"name": "a", "app_id": "x", "user_key": "y"},
                {"name": "b", "app_id": "x", "user_key": "w"},
            ],
            "share the app_id (account b)",
        ),
        (
            [{"name": "a", "app_id": "x", "user_key": "y", "failure_rate": {"start": 2}}],
            "between 0 and 1",
        ),
        ([{"name": "a", "app_id": "x", "user_key": "y", "refuse_key": "maybe"}], "true or false"),
        ("a", "must be a list"),
    ],
)
def test_bad_accounts_are_refused(accounts: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SimulatorConfig().with_changes(accounts=accounts)


def test_accounts_file(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_text(
        json.dumps(
            {
                "accounts": [
                    {
                        "name": "eu",
                        "app_id": "app-eu",
                        "user_key": "key-eu",
                        "max_concurrent_sessions": 2,
                    }
                ]
            }
        )
    )
    config = SimulatorConfig.from_options(accounts_file=str(path), latency="0.1")
    assert [(a.name, a.max_concurrent_sessions) for a in config.account_list()] == [("eu", 2)]
    assert config.latency_for("start", "eu") == 0.1
    path.write_text("[{")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        load_accounts_file(path)
    path.write_text(json.dumps([{"name": "eu", "app_id": "secret-app", "user_key": "k", "x": 1}]))
    with pytest.raises(ValueError, match="unknown account field") as error:
        load_accounts_file(path)
    assert str(path) in str(error.value)
    assert "secret-app" not in str(error.value)
    path.write_text("[]")
    with pytest.raises(ValueError, match="names no account"):
        load_accounts_file(path)


def test_module_entry_point_refuses_a_bad_accounts_file(tmp_path: Path) -> None:
    path = write_accounts(tmp_path, [{"name": "eu", "app_id": "x", "user_key": "y", "cap": 1}])
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.simulator", "--accounts-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {path}: unknown account field(s): cap"


def write_accounts(folder: Path, accounts: list[dict[str, Any]]) -> Path:
    path = folder / "accounts.json"
    path.write_text(json.dumps(accounts))
    return path


def test_cli_simulator_refuses_a_bad_accounts_file_in_one_line(tmp_path: Path) -> None:
    path = write_accounts(tmp_path, [{"name": "eu", "app_id": "x", "user_key": "y", "cap": 1}])
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "simulator", "--accounts-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (f"Error: {path}: unknown account field(s): cap")
