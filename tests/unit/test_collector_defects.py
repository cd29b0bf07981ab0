"""Collector defects, each over real sockets against CollectorThread on the real broker (the `broker`
fixture runs every test on the embedded broker and on Apache Kafka):

- the write key is checked before any body work when it travels outside the body, and the work
  before the check is bounded when it can only be in the body;
- a client that sends its headers or body too slowly (or not at all) is answered 408 or
  disconnected within COLLECTOR_READ_TIMEOUT_SECONDS, never held open;
- every unusable body is a 4xx, never a 5xx: JSON nested deeper than the encoder writes, integers
  beyond 64 bits, broken chunked framing, as well as invalid UTF-8 and non-object JSON.
"""

from __future__ import annotations

import base64
import gzip
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
import requests
from prometheus_client import REGISTRY

from tests.kafka_helpers import read_count, settings_for, settle, setup_topics
from worker.collector.server import CollectorThread
from worker.collector.settings import CollectorSettings
from worker.config import Config
from worker.kafka.broker import LoopbackBroker
from worker.kafka.reading import TopicMissing, partitions_of

KEY = "wk_defects"
READ_TIMEOUT = 1.5
SLACK = 2.0  # scheduling, a loaded machine
QUICK = 1.0  # "at once": well inside the read timeout, so not the timeout answering


@pytest.fixture
def settings(broker: LoopbackBroker, prefix: str) -> Config:
    settings = settings_for(broker, prefix, partitions=1)
    setup_topics(settings)
    wait_for_topic(settings)
    return settings


def wait_for_topic(settings: Config, timeout: float = 20.0) -> None:
    """Apache Kafka answers UNKNOWN_TOPIC_OR_PART for a moment after creating a topic; the tests that
    check nothing was written read the raw topic without having written to it first."""
    reader = settings.kafka.reader("topic-wait")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                partitions_of(reader, settings.names.raw, timeout=2)
                return
            except TopicMissing:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        reader.close()


@pytest.fixture
def collector(settings: Config) -> Iterator[CollectorThread]:
    collector_settings = CollectorSettings(
        write_keys=[KEY],  # type: ignore[list-item]
        read_timeout_seconds=READ_TIMEOUT,
        ack_timeout_seconds=10,
    )
    with CollectorThread(settings, collector_settings) as running:
        yield running


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def connect(collector: CollectorThread, timeout: float = READ_TIMEOUT + SLACK + 3) -> socket.socket:
    sock = socket.create_connection((collector.host, collector.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def head(path: str, *headers: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: collector\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or its first complete answer),
    and when the first byte came."""
    started = time.monotonic()
    data = b""
    first = None
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if first is None:
            first = time.monotonic() - started
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and _complete(data):
            break
    return data, first if first is not None else time.monotonic() - started


def _complete(data: bytes) -> bool:
    header, _, body = data.partition(b"\r\n\r\n")
    if header.startswith(b"HTTP/1.1 100"):
        return _complete(body) if body else False
    for line in header.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def closes_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Wait for the server to close the connection; what it sent first, and after how long."""
    started = time.monotonic()
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {seconds}s (sent {data[:60]!r})")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


# -- 1. the write key before the body ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key_header"),
    [
        ("/v1/track", f"Authorization: {basic('wrong')}"),
        ("/v1/track", "X-Write-Key: wrong"),
        ("/v1/track?writeKey=wrong", None),
        # A Basic credential that cannot be read is a wrong key, not a missing one: the body
        # (which might carry a `writeKey`) is not waited for.
        ("/v1/track", "Authorization: Basic !!not-base64!!"),
        ("/v1/track", "Authorization: Basic " + base64.b64encode(b":").decode()),
    ],
    ids=["basic", "header", "query", "unreadable-basic", "empty-basic"],
)
def test_a_wrong_key_outside_the_body_is_refused_without_waiting_for_the_body(
    collector: CollectorThread, settings: Config, path: str, key_header: str | None
) -> None:
    sock = connect(collector)
    with sock:
        sock.sendall(head(path, *([key_header] if key_header else []), "Content-Length: 100000"))
        answer, after = read_answer(sock)  # the body is never sent
    assert status_of(answer) == 401, answer[:200]
    assert after < QUICK, f"answered after {after:.2f}s: the body was waited for"
    assert settle(settings, "raw", timeout=1) == []


def test_expect_100_continue_with_a_wrong_key_is_refused_instead_of_invited(collector: CollectorThread) -> None:
    sock = connect(collector)
    with sock:
        sock.sendall(head("/v1/batch", "X-Write-Key: wrong", "Expect: 100-continue", "Content-Length: 400000"))
        answer, after = read_answer(sock)
    assert status_of(answer) == 401, answer[:200]  # not "100 Continue": the body is never invited
    assert after < QUICK


@pytest.mark.parametrize(
    "headers",
    [
        ("Content-Encoding: br", "X-Write-Key: " + KEY),  # 415: a body we could not decode
        ("Content-Length: 2000000", "X-Write-Key: " + KEY),  # 413: over COLLECTOR_MAX_BODY_BYTES
        ("Content-Length: 40000", "X-Write-Key: " + KEY),  # 400: an unencoded event over 32 KB
    ],
    ids=["encoding", "max-body", "payload-limit"],
)
def test_expect_100_continue_is_answered_from_the_headers_when_they_decide(
    collector: CollectorThread, headers: tuple[str, ...]
) -> None:
    sock = connect(collector)
    with sock:
        sock.sendall(head("/v1/track", *headers, "Expect: 100-continue"))
        answer, after = read_answer(sock)
    assert status_of(answer) in (400, 413, 415), answer[:200]
    assert after < QUICK


def test_expect_100_continue_with_a_good_key_or_a_key_in_the_body_is_invited(
    collector: CollectorThread, settings: Config
) -> None:
    for key_header, body in [
        (f"X-Write-Key: {KEY}", {"userId": "expect-1", "event": "E"}),
        (None, {"userId": "expect-2", "event": "E", "writeKey": KEY}),
    ]:
        data = orjson.dumps(body)
        sock = connect(collector)
        with sock:
            headers = [*([key_header] if key_header else []), "Expect: 100-continue", f"Content-Length: {len(data)}"]
            sock.sendall(head("/v1/track", *headers))
            interim = sock.recv(65536)
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            sock.sendall(data)
            answer, _after = read_answer(sock)
        assert status_of(answer) == 200, answer[:300]
    assert {orjson.loads(m.value())["userId"] for m in read_count(settings, "raw", 2, timeout=20)} == {
        "expect-1",
        "expect-2",
    }


def test_with_the_key_only_in_the_body_no_more_than_the_payload_limit_is_read(
    collector: CollectorThread, settings: Config
) -> None:
    # Announced: 40 KB on an event endpoint (limit 32 KB) is refused from the headers alone.
    sock = connect(collector)
    with sock:
        sock.sendall(head("/v1/track", "Content-Length: 40000"))
        answer, after = read_answer(sock)
    assert status_of(answer) == 400 and b"Exceed payload limit" in answer, answer[:300]
    assert after < QUICK
    # Chunked (no length announced): refused as soon as the limit is passed, the rest unread.
    sock = connect(collector)
    with sock:
        sock.sendall(head("/v1/track", "Transfer-Encoding: chunked"))
        chunk = b'{"writeKey": "' + KEY.encode() + b'", "p": "' + b"x" * 33_000
        sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")  # and then nothing: no last chunk
        answer, after = read_answer(sock)
    assert status_of(answer) == 400 and b"Exceed payload limit" in answer, answer[:300]
    assert after < QUICK
    assert settle(settings, "raw", timeout=1) == []


def test_with_the_key_only_in_the_body_a_gzip_bomb_is_not_inflated_past_the_limit(
    collector: CollectorThread, settings: Config
) -> None:
    bomb = gzip.compress(b'{"writeKey": "' + KEY.encode() + b'", "batch": [' + b" " * (200 * 1024 * 1024), 9)
    assert len(bomb) < 1024 * 1024  # under COLLECTOR_MAX_BODY_BYTES: it is read, then inflated within a bound
    started = time.monotonic()
    answer = requests.post(f"{collector.url}/v1/batch", data=bomb, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["code"] == "payload_too_large"
    assert time.monotonic() - started < 2  # 200 MB were not inflated
    assert settle(settings, "raw", timeout=1) == []


# -- 2. slow clients -----------------------------------------------------------------------------


def test_half_sent_headers_are_answered_408_and_closed_within_the_read_timeout(collector: CollectorThread) -> None:
    sock = connect(collector)
    with sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: collector\r\nX-Write-Key: " + KEY.encode() + b"\r\n")
        answer, after = closes_within(sock, READ_TIMEOUT + SLACK)
    assert after >= READ_TIMEOUT - 0.2
    assert answer == b"" or status_of(answer) == 408, answer[:200]


def test_a_connection_that_sends_nothing_is_closed_within_the_read_timeout(collector: CollectorThread) -> None:
    sock = connect(collector)
    with sock:
        answer, after = closes_within(sock, READ_TIMEOUT + SLACK)
    assert answer == b"" or status_of(answer) == 408
    assert after >= READ_TIMEOUT - 0.2


def test_headers_trickled_a_byte_at_a_time_do_not_keep_the_connection_open(collector: CollectorThread) -> None:
    """Each byte arrives well within the timeout; the headers as a whole do not."""
    request = head("/v1/track", f"X-Write-Key: {KEY}", "Content-Length: 2") + b"{}"
    sock = connect(collector)
    started = time.monotonic()
    closed = False
    with sock:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > READ_TIMEOUT + SLACK:
                break
        if not closed:
            answer, _after = closes_within(sock, READ_TIMEOUT + SLACK)
            assert answer == b"" or status_of(answer) == 408, answer[:200]
    assert time.monotonic() - started < READ_TIMEOUT + 2 * SLACK
    assert len(request) * 0.1 > READ_TIMEOUT + SLACK  # the trickle would have outlasted the timeout


def test_a_body_that_stops_midway_is_answered_408_and_closed(collector: CollectorThread, settings: Config) -> None:
    sock = connect(collector)
    with sock:
        sock.sendall(head("/v1/track", f"X-Write-Key: {KEY}", "Content-Length: 100") + b'{"userId": "slow"')
        answer, after = closes_within(sock, READ_TIMEOUT + SLACK)
    assert status_of(answer) == 408, answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert after >= READ_TIMEOUT - 0.2
    assert settle(settings, "raw", timeout=1) == []


def test_a_kept_alive_connection_that_stalls_in_its_next_request_is_closed(collector: CollectorThread) -> None:
    body = orjson.dumps({"userId": "keep", "event": "E"})
    sock = connect(collector)
    with sock:
        sock.sendall(head("/v1/track", f"X-Write-Key: {KEY}", f"Content-Length: {len(body)}") + body)
        first, _after = read_answer(sock)
        assert status_of(first) == 200, first[:200]
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: coll")  # and no more
        answer, after = closes_within(sock, READ_TIMEOUT + SLACK)
    assert answer == b"" or status_of(answer) == 408, answer[:200]
    assert after >= READ_TIMEOUT - 0.2


def test_a_client_that_is_slow_but_within_the_timeout_is_served(collector: CollectorThread, settings: Config) -> None:
    body = orjson.dumps({"userId": "patient", "event": "E"})
    sock = connect(collector)
    with sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: collector\r\n")
        time.sleep(READ_TIMEOUT / 3)
        sock.sendall(f"X-Write-Key: {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        time.sleep(READ_TIMEOUT / 3)
        sock.sendall(body[5:])
        answer, _after = read_answer(sock)
        assert status_of(answer) == 200, answer[:200]
        # Then idle on the kept-alive connection for longer than the read timeout: not a slow request.
        time.sleep(READ_TIMEOUT + 0.5)
        sock.sendall(head("/v1/track", f"X-Write-Key: {KEY}", f"Content-Length: {len(body)}") + body)
        again, _after = read_answer(sock)
    assert status_of(again) == 200, again[:200]
    assert len(read_count(settings, "raw", 2, timeout=20)) == 2


# -- 3. every unusable body is a 4xx -------------------------------------------------------------


def nested(depth: int) -> bytes:
    """An event whose total nesting (its own object included) is `depth` levels."""
    body = b'{"type": "track", "userId": "deep", "event": "E", "properties": '
    return body + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def post(collector: CollectorThread, path: str, body: bytes, **headers: str) -> requests.Response:
    return requests.post(collector.url + path, data=body, headers={"X-Write-Key": KEY, **headers}, timeout=30)


@pytest.mark.parametrize("depth", [255, 300, 1000, 1024])
def test_json_nested_deeper_than_the_encoder_writes_is_400(collector: CollectorThread, depth: int) -> None:
    for path in ("/v1/track", "/api/v1/segment"):
        answer = post(collector, path, nested(depth))
        assert answer.status_code == 400, (path, answer.status_code, answer.text[:200])
    # In a batch the envelope adds two levels (document, `batch` array) to each item's.
    item = nested(depth - 2)
    for path in ("/v1/batch", "/api/v1/segment"):
        answer = post(collector, path, b'{"batch": [' + item + b"]}")
        assert answer.status_code == 400, (path, answer.status_code, answer.text[:200])


def test_json_as_deep_as_the_encoder_writes_is_stored(collector: CollectorThread, settings: Config) -> None:
    assert post(collector, "/v1/track", nested(254)).status_code == 200
    assert post(collector, "/v1/batch", b'{"batch": [' + nested(252) + b"]}").status_code == 200
    assert len(read_count(settings, "raw", 2, timeout=20)) == 2


@pytest.mark.parametrize(
    "number", [b"18446744073709551616", b"-9223372036854775809", b"123456789012345678901234567890", b"-" + b"9" * 300]
)
def test_integers_beyond_64_bits_are_400_not_stored_as_other_numbers(
    collector: CollectorThread, settings: Config, number: bytes
) -> None:
    for path, body in [
        ("/v1/track", b'{"userId": "big", "properties": {"n": ' + number + b"}}"),
        ("/v1/batch", b'{"batch": [{"type": "track", "userId": "big", "properties": {"n": [1, ' + number + b"]}}]}"),
        ("/api/v1/segment", b'{"type": "track", "userId": ' + number + b"}"),
    ]:
        answer = post(collector, path, body)
        assert answer.status_code == 400, (path, answer.status_code, answer.text[:200])
    assert settle(settings, "raw", timeout=1) == []


def test_integers_within_64_bits_are_stored_exactly(collector: CollectorThread, settings: Config) -> None:
    body = (
        b'{"userId": "n", "properties": {"max": 18446744073709551615, "min": -9223372036854775808, '
        b'"s": "123456789012345678901234567890", "f": 0.12345678901234567890123, "e": 12345678901234567890123e-3}}'
    )
    assert post(collector, "/v1/track", body).status_code == 200
    [stored] = read_count(settings, "raw", 1, timeout=20)
    assert b'"max":18446744073709551615' in stored.value() and b'"min":-9223372036854775808' in stored.value()
    assert orjson.loads(stored.value())["properties"]["s"] == "123456789012345678901234567890"


@pytest.mark.parametrize(
    "body",
    [
        b'{"userId": "\xff\xfe"}',  # invalid UTF-8
        b'{"userId": "\xed\xa0\x80"}',  # an encoded surrogate: not UTF-8 either
        b'{"userId": "\\ud800"}',  # a lone surrogate escape
        b"[]",
        b'"text"',
        b"42",
        b"null",
        b"true",
        b"",
        b"   \n",
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b'{"userId": 1e400}',  # a number no double holds
        b'{"userId": NaN}',
        b'{"a": 1} {"b": 2}',  # two documents
        b'{"userId": "u"',  # truncated
    ],
)
def test_other_unusable_bodies_are_400(collector: CollectorThread, body: bytes) -> None:
    for path in ("/v1/track", "/v1/batch", "/api/v1/segment"):
        answer = post(collector, path, body)
        assert answer.status_code == 400, (path, body, answer.status_code, answer.text[:200])
        unkeyed = requests.post(collector.url + path, data=body, timeout=30)
        assert unkeyed.status_code == 401, (path, body, unkeyed.status_code)  # no key could be read


def test_chunked_framing_broken_midway_is_400(collector: CollectorThread, settings: Config) -> None:
    sock = connect(collector)
    with sock:
        sock.sendall(head("/v1/track", f"X-Write-Key: {KEY}", "Transfer-Encoding: chunked"))
        sock.sendall(b'c\r\n{"userId": "\r\n')  # one good chunk of 12 bytes
        time.sleep(0.3)  # the handler is reading the body by now
        sock.sendall(b"zz-not-a-chunk-size\r\n\r\n")
        answer, _after = read_answer(sock)
    assert 400 <= status_of(answer) < 500, answer[:300]
    assert settle(settings, "raw", timeout=1) == []


def answered(status: int, path: str = "/v1/track") -> float:
    labels = {"endpoint": path, "status": str(status)}
    return REGISTRY.get_sample_value("segment_worker_collector_requests_total", labels) or 0.0


def test_a_client_gone_midway_is_not_a_5xx(collector: CollectorThread) -> None:
    """Nobody reads the answer; what it was counted as still shows on dashboards and alerts."""
    before = {status: answered(status) for status in (400, 500)}
    sock = connect(collector)
    sock.sendall(head("/v1/track", f"X-Write-Key: {KEY}", "Content-Length: 1000") + b'{"userId": "gone"')
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 5
    while answered(400) == before[400] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answered(400) == before[400] + 1  # the body could not be read: the client's doing
    assert answered(500) == before[500]
