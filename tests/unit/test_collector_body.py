"""Content-Encoding handling: gzip bodies inflate within a bound, a gzip bomb is refused."""

from __future__ import annotations

import gzip
import zlib

import pytest

from worker.collector.body import decode_content, gunzip_bounded
from worker.collector.responses import HttpError

LIMIT = 500 * 1024


def test_identity_body_passes_through() -> None:
    assert decode_content(b'{"a": 1}', None, LIMIT) == b'{"a": 1}'
    assert decode_content(b'{"a": 1}', "identity", LIMIT) == b'{"a": 1}'


def test_identity_body_over_the_limit_is_segments_400() -> None:
    with pytest.raises(HttpError) as caught:
        decode_content(b"x" * (LIMIT + 1), None, LIMIT)
    assert caught.value.status == 400
    assert caught.value.message.startswith("Exceed payload limit")


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", " x-gzip "])
def test_gzip_body_is_inflated(encoding: str) -> None:
    payload = b'{"type": "track", "event": "E"}' * 100
    assert decode_content(gzip.compress(payload), encoding, LIMIT) == payload


def test_gzip_exactly_at_the_limit_is_accepted() -> None:
    payload = b"a" * LIMIT
    assert gunzip_bounded(gzip.compress(payload), LIMIT) == payload


def test_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024), compresslevel=9)  # 200 MB in ~200 KB
    assert len(bomb) < 300_000
    with pytest.raises(HttpError) as caught:
        gunzip_bounded(bomb, LIMIT)
    assert caught.value.status == 400
    assert "larger than 512000 bytes" in caught.value.message


def test_a_bomb_split_across_gzip_members_is_bounded_too() -> None:
    member = gzip.compress(b"\0" * (LIMIT // 2 + 1))
    with pytest.raises(HttpError):
        gunzip_bounded(member * 3, LIMIT)
    assert gunzip_bounded(gzip.compress(b"ab") + gzip.compress(b"cd"), LIMIT) == b"abcd"


@pytest.mark.parametrize(
    "body",
    [b"not gzip at all", gzip.compress(b'{"a": 1}')[:-6], zlib.compress(b'{"a": 1}')],
    ids=["garbage", "truncated", "zlib-not-gzip"],
)
def test_broken_gzip_is_400(body: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        gunzip_bounded(body, LIMIT)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_request"


def test_unknown_encoding_is_415() -> None:
    with pytest.raises(HttpError) as caught:
        decode_content(b"...", "br", LIMIT)
    assert caught.value.status == 415
