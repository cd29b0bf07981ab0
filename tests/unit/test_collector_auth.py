"""Where a write key may travel (Basic auth, headers, query, body) and how it is checked."""

from __future__ import annotations

import base64

import pytest

from worker.collector.auth import WriteKeys, key_from_basic_auth, key_from_body, key_from_request


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic("wk_123"), "wk_123"),  # Segment: the key is the user, the password empty
        (basic("wk_123", "ignored"), "wk_123"),
        (basic("", "wk_123"), "wk_123"),  # key put in the password by mistake
        ("basic " + base64.b64encode(b"wk_123:").decode(), "wk_123"),  # the scheme is case-insensitive
        ("Basic " + base64.b64encode(b"wk_123").decode(), "wk_123"),  # no colon at all
        ("Basic not-base64!!", None),
        ("Basic " + base64.b64encode(b"\xff\xfe:").decode(), None),  # not UTF-8
        ("Basic " + base64.b64encode(b":").decode(), None),  # both empty
        ("Bearer wk_123", None),  # OAuth tokens are not write keys
        ("Basic", None),
        ("", None),
        (None, None),
    ],
)
def test_basic_auth_parsing(header: str | None, expected: str | None) -> None:
    assert key_from_basic_auth(header) == expected


def test_key_from_each_place_outside_the_body() -> None:
    assert key_from_request({"Authorization": basic("a")}, {}) == "a"
    assert key_from_request({"X-Write-Key": "b"}, {}) == "b"
    assert key_from_request({"X-Auth-Token": "c"}, {}) == "c"  # Jitsu's header
    assert key_from_request({}, {"writeKey": "d"}) == "d"
    assert key_from_request({}, {"token": "e"}) == "e"  # Jitsu's query parameter
    assert key_from_request({}, {}) is None


def test_basic_auth_wins_over_headers_and_query() -> None:
    headers = {"Authorization": basic("basic-key"), "X-Write-Key": "header-key"}
    assert key_from_request(headers, {"writeKey": "query-key"}) == "basic-key"
    assert key_from_request({"X-Write-Key": "header-key"}, {"writeKey": "query-key"}) == "header-key"


def test_key_from_body() -> None:
    assert key_from_body({"writeKey": "wk", "type": "track"}) == "wk"
    assert key_from_body({"writeKey": 12}) is None
    assert key_from_body({"writeKey": ""}) is None
    assert key_from_body({}) is None


def test_write_keys_accept_only_configured_keys() -> None:
    keys = WriteKeys(["alpha", "beta"])
    assert keys.accepts("alpha") and keys.accepts("beta")
    assert not keys.accepts("alph")
    assert not keys.accepts("alphaa")
    assert not keys.accepts("")
    assert not keys.accepts(None)
    assert not keys.accepts("\udcff")  # a lone surrogate from a mis-decoded header must not raise


def test_no_configured_keys_accept_nothing() -> None:
    keys = WriteKeys([])
    assert not keys
    assert not keys.accepts("anything")
