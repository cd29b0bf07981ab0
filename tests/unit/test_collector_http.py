"""The collector over real sockets, writing to the real embedded broker (no mocks)."""

from __future__ import annotations

import base64
import gzip
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from tests.kafka_helpers import read_count, settings_for, settle, setup_topics
from worker.collector.payloads import EVENT_TYPES
from worker.collector.server import CollectorThread
from worker.collector.settings import CollectorSettings
from worker.config import Config
from worker.kafka.broker import EmbeddedBroker, free_port

KEY = "wk_test_1"
OTHER_KEY = "wk_test_2"


def collector_settings(**values: object) -> CollectorSettings:
    return CollectorSettings(write_keys=[KEY, OTHER_KEY], **values)  # type: ignore[arg-type]


@pytest.fixture
def settings(broker: EmbeddedBroker, prefix: str) -> Config:
    settings = settings_for(broker, prefix, partitions=1)
    setup_topics(settings)
    return settings


@pytest.fixture
def collector(settings: Config) -> Iterator[CollectorThread]:
    with CollectorThread(settings, collector_settings(ack_timeout_seconds=5)) as running:
        yield running


def events_on_raw(settings: Config, count: int) -> list[dict]:
    return [orjson.loads(m.value()) for m in read_count(settings, "raw", count, timeout=20)]


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def test_write_key_by_basic_auth_header_query_and_body(collector: CollectorThread, settings: Config) -> None:
    event = {"userId": "u1", "event": "Signed Up"}
    url = f"{collector.url}/v1/track"
    answers = [
        requests.post(url, json=event, headers=basic(KEY)),
        requests.post(url, json=event, headers={"X-Write-Key": OTHER_KEY}),
        requests.post(url, json=event, headers={"X-Auth-Token": KEY}),
        requests.post(url, json=event, params={"writeKey": KEY}),
        requests.post(url, json=event, params={"token": KEY}),
        requests.post(url, json={**event, "writeKey": KEY}),
    ]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"success": True})] * 6
    stored = read_count(settings, "raw", 6, timeout=20)
    assert len(stored) == 6
    assert all(m.key() == b"u1" for m in stored)
    assert not any(KEY.encode() in m.value() for m in stored)  # the key never reaches Kafka


def test_unknown_or_missing_key_is_401_and_writes_nothing(collector: CollectorThread, settings: Config) -> None:
    event = {"userId": "u1", "event": "E"}
    url = f"{collector.url}/v1/track"
    answers = [
        requests.post(url, json=event, headers=basic("wrong")),
        requests.post(url, json=event, headers={"X-Write-Key": "wrong"}),
        requests.post(url, json=event, params={"writeKey": "wrong"}),
        requests.post(url, json={**event, "writeKey": "wrong"}),
        requests.post(url, json=event),
        # A valid key in the body does not rescue a wrong one outside it.
        requests.post(url, json={**event, "writeKey": KEY}, headers={"X-Write-Key": "wrong"}),
        # Without a key we can read, a malformed body says nothing more than 401.
        requests.post(url, data=b"{not json"),
    ]
    for answer in answers:
        assert answer.status_code == 401
        assert answer.json() == {"success": False, "code": "unauthorized", "message": "missing or unknown write key"}
        assert "wrong" not in answer.text
    assert settle(settings, "raw", timeout=2) == []


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_typed_endpoints_set_type(collector: CollectorThread, settings: Config, event_type: str) -> None:
    answer = requests.post(
        f"{collector.url}/v1/{event_type}", json={"type": "bogus", "anonymousId": "a1"}, headers=basic(KEY)
    )
    assert answer.status_code == 200
    [event] = events_on_raw(settings, 1)
    assert event["type"] == event_type


def test_batch_and_import_stamp_every_item(collector: CollectorThread, settings: Config) -> None:
    batch = {"batch": [{"type": "track", "userId": "u1", "event": "A"}, {"type": "page", "userId": "u1"}]}
    for path in ("/v1/batch", "/v1/import"):
        assert requests.post(collector.url + path, json=batch, headers=basic(KEY)).json() == {"success": True}
    envelopes = events_on_raw(settings, 4)  # one message an event
    assert all(len(envelope["batch"]) == 1 for envelope in envelopes)
    items = [envelope["batch"][0] for envelope in envelopes]
    assert [item["type"] for item in items] == ["track", "page"] * 2  # one key, one partition: in order
    assert [item["context"]["ip"] for item in items] == ["127.0.0.1"] * 4
    assert all(item["receivedAt"].endswith("Z") for item in items)


def test_concurrent_requests_each_write_exactly_one_message(collector: CollectorThread, settings: Config) -> None:
    def send(n: int) -> int:
        event = {"userId": f"user-{n % 5}", "event": "E", "properties": {"n": n}}
        return requests.post(f"{collector.url}/v1/track", json=event, headers=basic(KEY), timeout=30).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(send, range(80)))
    assert statuses == [200] * 80
    stored = settle(settings, "raw", timeout=3)
    assert sorted(orjson.loads(m.value())["properties"]["n"] for m in stored) == list(range(80))


def test_batch_must_be_a_list(collector: CollectorThread, settings: Config) -> None:
    answer = requests.post(f"{collector.url}/v1/batch", json={"batch": {"type": "track"}}, headers=basic(KEY))
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_request"
    assert settle(settings, "raw", timeout=2) == []


@pytest.mark.parametrize("path", ["/api/v1/segment", "/api/v1/segment/compat"])
def test_jitsu_endpoints_take_an_event_or_a_batch(collector: CollectorThread, settings: Config, path: str) -> None:
    single = requests.post(
        collector.url + path, json={"type": "track", "userId": "u", "event": "E"}, params={"token": KEY}
    )
    batch = requests.post(
        collector.url + path, json={"batch": [{"type": "identify", "userId": "u"}]}, headers={"X-Auth-Token": KEY}
    )
    assert [(a.status_code, a.json()) for a in (single, batch)] == [(200, {"status": "ok"})] * 2
    single_event, envelope = sorted(events_on_raw(settings, 2), key=lambda d: "batch" in d)
    assert single_event["type"] == "track" and envelope["batch"][0]["type"] == "identify"


def test_gzip_body_is_accepted(collector: CollectorThread, settings: Config) -> None:
    body = gzip.compress(orjson.dumps({"userId": "u-gz", "event": "Zipped"}))
    answer = requests.post(f"{collector.url}/v1/track", data=body, headers={**basic(KEY), "Content-Encoding": "gzip"})
    assert answer.status_code == 200
    [event] = events_on_raw(settings, 1)
    assert event["event"] == "Zipped"


def test_gzip_bomb_is_refused_and_writes_nothing(collector: CollectorThread, settings: Config) -> None:
    bomb = gzip.compress(b'{"batch": [' + b" " * (100 * 1024 * 1024) + b"]}", compresslevel=9)
    answer = requests.post(f"{collector.url}/v1/batch", data=bomb, headers={**basic(KEY), "Content-Encoding": "gzip"})
    assert answer.status_code == 400
    assert answer.json()["code"] == "payload_too_large"
    assert settle(settings, "raw", timeout=2) == []


def test_size_limits(settings: Config) -> None:
    with CollectorThread(settings, collector_settings(max_body_bytes=600 * 1024)) as collector:
        big_event = {"userId": "u", "event": "E", "properties": {"p": "x" * 33 * 1024}}
        event_answer = requests.post(f"{collector.url}/v1/track", json=big_event, headers=basic(KEY))
        items = [{"type": "track", "userId": "u", "event": "E", "properties": {"p": "x" * 30_000}}] * 18
        batch_answer = requests.post(f"{collector.url}/v1/batch", json={"batch": items}, headers=basic(KEY))
        wire_answer = requests.post(f"{collector.url}/v1/batch", data=b" " * (700 * 1024), headers=basic(KEY))
    for answer in (event_answer, batch_answer):
        assert answer.status_code == 400
        assert answer.json()["code"] == "payload_too_large"
        assert answer.json()["message"].startswith("Exceed payload limit")
    assert wire_answer.status_code == 413
    assert wire_answer.json()["code"] == "request_too_large"
    assert settle(settings, "raw", timeout=2) == []


def test_forwarded_for_is_believed_from_a_trusted_peer_only(settings: Config) -> None:
    forwarded = {"X-Forwarded-For": "198.51.100.7, 127.0.0.1", **basic(KEY)}
    with CollectorThread(settings, collector_settings()) as trusting:  # loopback peers are trusted by default
        assert requests.post(f"{trusting.url}/v1/track", json={"userId": "t", "event": "E"}, headers=forwarded).ok
        [trusted_event] = events_on_raw(settings, 1)
    with CollectorThread(settings, collector_settings(trusted_proxies=["10.0.0.0/8"])) as distrusting:
        assert requests.post(f"{distrusting.url}/v1/track", json={"userId": "d", "event": "E"}, headers=forwarded).ok
        events = events_on_raw(settings, 2)
    assert trusted_event["context"]["ip"] == "198.51.100.7"
    assert next(e for e in events if e["userId"] == "d")["context"]["ip"] == "127.0.0.1"


def test_health_readiness_and_metrics(collector: CollectorThread) -> None:
    assert requests.get(f"{collector.url}/healthz").status_code == 200
    assert requests.get(f"{collector.url}/readyz").status_code == 200
    requests.post(f"{collector.url}/v1/track", json={}, headers={"X-Write-Key": "nope"})
    metrics = requests.get(f"{collector.url}/metrics").text
    assert 'segment_worker_collector_requests_total{endpoint="/v1/track",status="401"}' in metrics


def test_recovers_after_the_broker_lost_its_state(prefix: str, tmp_path) -> None:
    """A restarted embedded broker forgets every producer id; the idempotent producer then fails
    every delivery (UNKNOWN_PRODUCER_ID) without ever reporting a fatal error. Requests get 503
    meanwhile, and the collector replaces its producer instead of staying stuck."""
    port = free_port()
    broker = EmbeddedBroker(port, log_path=tmp_path / "tansu.log").start()
    try:
        settings = settings_for(broker, prefix, partitions=1)
        setup_topics(settings)
        with CollectorThread(settings, collector_settings(ack_timeout_seconds=1)) as collector:

            def send(n: int) -> int:
                event = {"userId": "u", "event": "E", "properties": {"n": n}}
                return requests.post(
                    f"{collector.url}/v1/track", json=event, headers=basic(KEY), timeout=30
                ).status_code

            # A new idempotent producer needs ~0.5 s for its producer id; with a 1 s timeout the very
            # first request can lose that race, so wait until the collector has written once.
            assert any(send(0) == 200 for _attempt in range(5))
            assert broker.process is not None
            broker.process.kill()  # a crash: memory storage, so every topic and producer id is gone
            broker.process.wait()
            broker = EmbeddedBroker(port, log_path=tmp_path / "tansu.log").start()
            setup_topics(settings)
            statuses = [send(n) for n in range(1, 7)]
        assert statuses[0] == 503 and statuses[-1] == 200, statuses
        assert 503 not in statuses[statuses.index(200) :], statuses  # once recovered, it stays so
        stored = [orjson.loads(m.value())["properties"]["n"] for m in settle(settings, "raw", timeout=2)]
        assert [n for n in stored if n] == [n for n, status in enumerate(statuses, start=1) if status == 200]
    finally:
        broker.stop()
