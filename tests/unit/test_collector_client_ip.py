"""context.ip: the socket peer, or the forwarding headers of a trusted proxy only."""

from __future__ import annotations

import pytest

from worker.collector.client_ip import TrustedProxies, client_ip, parse_address
from worker.collector.settings import DEFAULT_TRUSTED_PROXIES, CollectorSettings
from worker.config_loader import ConfigError

LOOPBACK = TrustedProxies(DEFAULT_TRUSTED_PROXIES)
PROXIES = TrustedProxies(["10.0.0.0/8", "127.0.0.1/32"])


def test_untrusted_peer_headers_are_ignored() -> None:
    assert client_ip("203.0.113.9", "198.51.100.1", "198.51.100.2", LOOPBACK) == "203.0.113.9"


def test_trusted_peer_forwarded_for_is_believed() -> None:
    assert client_ip("127.0.0.1", "198.51.100.1", None, LOOPBACK) == "198.51.100.1"
    assert client_ip("::1", "198.51.100.1", None, LOOPBACK) == "198.51.100.1"


def test_left_most_when_every_later_hop_is_a_trusted_proxy() -> None:
    assert client_ip("10.0.0.5", "198.51.100.1, 10.0.0.7, 10.0.0.6", None, PROXIES) == "198.51.100.1"


def test_a_spoofed_left_most_entry_is_not_believed() -> None:
    # The client sent "X-Forwarded-For: 1.1.1.1"; our proxy appended the address it saw.
    assert client_ip("10.0.0.5", "1.1.1.1, 198.51.100.1", None, PROXIES) == "198.51.100.1"


def test_real_ip_when_there_is_no_forwarded_for() -> None:
    assert client_ip("127.0.0.1", None, "198.51.100.3", LOOPBACK) == "198.51.100.3"
    assert client_ip("127.0.0.1", "198.51.100.1", "198.51.100.3", LOOPBACK) == "198.51.100.1"


def test_garbled_headers_fall_back_to_the_peer() -> None:
    assert client_ip("127.0.0.1", "198.51.100.1, unknown", None, LOOPBACK) == "127.0.0.1"
    assert client_ip("127.0.0.1", None, "not-an-ip", LOOPBACK) == "127.0.0.1"
    assert client_ip("127.0.0.1", "", "", LOOPBACK) == "127.0.0.1"


def test_no_peer_no_ip() -> None:
    assert client_ip(None, "198.51.100.1", None, LOOPBACK) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.1", "198.51.100.1"),
        (" 198.51.100.1:4711 ", "198.51.100.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:198.51.100.1", "198.51.100.1"),  # dual-stack sockets report IPv4 peers like this
        ("unknown", None),
        ("", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed else None) == expected


def test_trusted_proxies_setting() -> None:
    sources = {"COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1", "COLLECTOR_MAX_BODY_BYTES": "2048"}
    settings = CollectorSettings.from_sources(sources)
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.168.1.1"]
    assert settings.max_body_bytes == 2048
    assert CollectorSettings.from_sources({}).trusted_proxies == ["127.0.0.0/8", "::1/128"]  # loopback only


def test_a_typo_in_trusted_proxies_stops_startup() -> None:
    with pytest.raises(ConfigError, match=r"COLLECTOR_TRUSTED_PROXIES=10\.0\.0\.0/33"):
        CollectorSettings.from_sources({"COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/33"})
