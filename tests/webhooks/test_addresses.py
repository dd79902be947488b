"""Where a webhook may go: the address policy on resolved addresses, and the transport that
connects to the address it checked (the DNS rebinding case)."""

from __future__ import annotations

import ipaddress
import time

import httpx
import pytest

from orchestrator.webhooks.addresses import AddressPolicy, Refused
from orchestrator.webhooks.transport import CheckedTransport
from tests.webhooks.receiver import receiving

LOOPBACK_ONLY = AddressPolicy(
    frozenset({"hooks.example.test"}), [ipaddress.ip_network("127.0.0.1/32")]
)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.8",
        "172.16.3.4",
        "192.168.1.1",
        "169.254.169.254",  # metadata
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "224.0.0.1",
        "240.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(Refused):
        AddressPolicy().check_address(address)


def test_public_and_allow_listed_addresses_pass() -> None:
    assert str(AddressPolicy().check_address("93.184.216.34")) == "93.184.216.34"
    assert str(LOOPBACK_ONLY.check_address("127.0.0.1")) == "127.0.0.1"
    with pytest.raises(Refused):
        LOOPBACK_ONLY.check_address("127.0.0.2")


def test_urls_need_https_unless_the_host_is_allow_listed() -> None:
    AddressPolicy().check_url("https://hooks.example.com/x")
    for url in ("http://hooks.example.com/x", "ftp://h/x", "https://u:p@hooks.example.com/"):
        with pytest.raises(Refused):
            AddressPolicy().check_url(url)
    LOOPBACK_ONLY.check_url("http://hooks.example.test:8080/x")
    LOOPBACK_ONLY.check_url("http://127.0.0.1:8080/x")


def test_a_name_with_one_private_answer_is_refused_whole() -> None:
    with pytest.raises(Refused):
        AddressPolicy().checked_addresses(lambda _h, _p: ["93.184.216.34", "10.0.0.1"], "h", 443)


class SecondAnswerPrivate:
    """A resolver that answers the receiver's loopback address once, then a private one."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return ["127.0.0.1"] if self.calls == 1 else ["10.1.2.3"]


def test_dns_rebinding_cannot_send_the_request_elsewhere() -> None:
    resolver = SecondAnswerPrivate()
    with receiving() as receiver:
        url = f"http://hooks.example.test:{receiver.port}/hook"
        transport = CheckedTransport(LOOPBACK_ONLY, resolver=resolver)
        with httpx.Client(transport=transport, follow_redirects=False) as client:
            first = client.post(url, content=b"{}", headers={"connection": "close"})
            assert first.status_code == 204
            with pytest.raises(Refused, match=r"10\.1\.2\.3"):
                client.post(url, content=b"{}")
        # One lookup per connection, checked and used: the private answer went nowhere.
        assert resolver.calls == 2
        assert len(receiver.requests()) == 1
        assert receiver.requests()[0].headers["host"] == f"hooks.example.test:{receiver.port}"


def test_a_kept_connection_is_reused_until_its_keep_alive_runs_out_then_checked_anew() -> None:
    """The sender's pool keeps connections (keep-alive): each was made to a checked address;
    once one has been idle past its expiry the next request makes a new one, which looks
    the name up and checks it again (no lookup is ever skipped by an old connection)."""
    resolver = SecondAnswerPrivate()
    with receiving() as receiver:
        receiver.server.RequestHandlerClass.protocol_version = "HTTP/1.1"  # type: ignore[attr-defined]
        url = f"http://hooks.example.test:{receiver.port}/hook"
        limits = httpx.Limits(max_keepalive_connections=8, keepalive_expiry=0.2)
        transport = CheckedTransport(LOOPBACK_ONLY, resolver=resolver, limits=limits)
        with httpx.Client(transport=transport, follow_redirects=False) as client:
            for _ in range(3):
                assert client.post(url, content=b"{}").status_code == 204
            assert resolver.calls == 1  # one connection, kept and reused
            time.sleep(0.4)
            with pytest.raises(Refused, match=r"10\.1\.2\.3"):
                client.post(url, content=b"{}")
        assert resolver.calls == 2
        assert len(receiver.requests()) == 3


def test_loopback_is_refused_without_an_allow_list() -> None:
    with receiving() as receiver:
        transport = CheckedTransport(AddressPolicy())
        with httpx.Client(transport=transport) as client, pytest.raises(Refused):
            client.post(receiver.url, content=b"{}")
        assert receiver.requests() == []
