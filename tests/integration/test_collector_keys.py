"""Keys and partitions on `segment.raw`: the collector writes one message an event, keyed by its
user, on the partition the Java client would choose for that key (murmur2); a request is 200 only
when every one of its messages was acknowledged. Real broker, real sockets (in-process collector)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import orjson
import pytest
import requests
from confluent_kafka import KafkaError, Message

from tests.kafka_helpers import read_count, settings_for, settle, setup_topics
from tests.unit.test_collector_payloads import KAFKA_TS, batch_with_every_envelope_field, normalised
from worker.collector.payloads import stamp
from worker.collector.server import CollectorThread
from worker.collector.settings import CollectorSettings
from worker.config import Config
from worker.kafka.broker import LoopbackBroker
from worker.kafka.clients import KafkaClients
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser

pytestmark = pytest.mark.integration

KEY = "wk_keys"
PARTITIONS = 6


def murmur2(data: bytes) -> int:
    """The Java client's `Utils.murmur2` (seed 0x9747b28c), as an unsigned 32-bit value."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    whole = len(data) - len(data) % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    rest = data[whole:]
    if len(rest) == 3:
        h ^= rest[2] << 16
    if len(rest) >= 2:
        h ^= rest[1] << 8
    if rest:
        h ^= rest[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


def java_partition(key: bytes, partitions: int) -> int:
    """The Java client's (and kafkajs') partition of a keyed record: toPositive(murmur2) % partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def test_the_reference_murmur2_is_javas() -> None:
    # Apache Kafka's own vectors (clients/.../common/utils/UtilsTest.java, testMurmur2).
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {data: signed(murmur2(data)) for data in vectors} == vectors


def test_every_producer_uses_the_java_partitioner_unless_the_user_chose_another() -> None:
    clients = KafkaClients({"bootstrap.servers": "127.0.0.1:9092"})
    assert clients.producer_config()["partitioner"] == "murmur2_random"
    assert "partitioner" not in clients.consumer_config("role")  # librdkafka would warn about it there
    chosen = Config.from_sources({"KAFKA_PARTITIONER": "consistent_random"}).kafka
    assert chosen.producer_config()["partitioner"] == "consistent_random"


@pytest.fixture
def settings(broker: LoopbackBroker, prefix: str) -> Config:
    settings = settings_for(broker, prefix, partitions=PARTITIONS)
    setup_topics(settings)
    return settings


@pytest.fixture
def collector(settings: Config) -> Iterator[CollectorThread]:
    collector_settings = CollectorSettings(write_keys=[KEY], ack_timeout_seconds=5)  # type: ignore[list-item]
    with CollectorThread(settings, collector_settings) as running:
        yield running


def test_the_products_producer_puts_a_key_where_the_java_client_would(settings: Config) -> None:
    keys = [b"21", b"foobar", b"abc", b"a-little-bit-long-string", *(f"user-{n}".encode() for n in range(20))]
    settings.kafka.produce_and_wait(settings.names.raw, [(key, b"{}") for key in keys])
    placed = {m.key(): m.partition() for m in read_count(settings, "raw", len(keys), timeout=20)}
    assert placed == {key: java_partition(key, PARTITIONS) for key in keys}
    assert len(set(placed.values())) > 1  # the keys really are spread, so the check means something


def raw_events(messages: list[Message]) -> list[tuple[Message, dict]]:
    pairs = []
    for message in messages:
        envelope = orjson.loads(message.value())
        assert envelope.keys() == {"batch"} and len(envelope["batch"]) == 1, envelope
        pairs.append((message, envelope["batch"][0]))
    return pairs


def test_a_batch_of_three_users_is_one_message_an_event_on_each_users_partition(
    collector: CollectorThread, settings: Config
) -> None:
    people = [{"userId": "ada"}, {"anonymousId": "anon-bob"}, {"userId": "cy", "anonymousId": "anon-cy"}]
    items = [
        {"type": "track", **people[n % 3], "event": "Step", "messageId": f"m{n}", "properties": {"n": n}}
        for n in range(9)
    ]
    answer = requests.post(f"{collector.url}/v1/batch", json={"batch": items}, auth=(KEY, ""), timeout=30)
    assert answer.status_code == 200 and answer.json() == {"success": True}

    written = raw_events(read_count(settings, "raw", len(items), timeout=20))
    assert len(written) == len(items)
    by_key: dict[bytes, list[tuple[int, int, int]]] = defaultdict(list)
    for message, event in written:
        key = message.key()
        assert key == (event.get("userId") or event["anonymousId"]).encode()
        assert message.partition() == java_partition(key, PARTITIONS)
        by_key[key].append((message.partition(), message.offset(), event["properties"]["n"]))
    assert sorted(by_key) == [b"ada", b"anon-bob", b"cy"]
    # Each user's events on their partition in the order of the batch.
    assert {key: [n for *_, n in sorted(placed)] for key, placed in by_key.items()} == {
        b"ada": [0, 3, 6],
        b"anon-bob": [1, 4, 7],
        b"cy": [2, 5, 8],
    }


def test_events_read_back_from_raw_normalise_as_their_whole_batch_did(
    collector: CollectorThread, settings: Config
) -> None:
    """Through the HTTP API and the broker: the events the collector wrote one a message, normalised
    at their real coordinates, give what the whole batch the collector used to write gives."""
    document = batch_with_every_envelope_field()
    answer = requests.post(f"{collector.url}/v1/batch", json=document, auth=(KEY, ""), timeout=30)
    assert answer.status_code == 200
    written = raw_events(read_count(settings, "raw", len(document["batch"]), timeout=20))
    position = {item.get("messageId"): index for index, item in enumerate(document["batch"])}
    written.sort(key=lambda pair: position[pair[1].get("messageId")])  # the batch's order, across partitions

    # The message the collector used to write: the same body, stamped as it stamped the events.
    received_at = written[0][1]["receivedAt"]
    assert all(event["receivedAt"] == received_at for _m, event in written)
    document.pop("writeKey")
    for item in document["batch"]:
        stamp(item, received_at, "127.0.0.1")
    whole = orjson.dumps(document)

    enrichers: list = []  # enrichment is per event and the same either way; the unit test runs it
    raw = settings.names.raw
    before = Normaliser(["amplitude", "brevo"], IdentityMap(100), enrichers).process(whole, KAFKA_TS, raw, 0, 0)
    each = Normaliser(["amplitude", "brevo"], IdentityMap(100), enrichers)
    after = [each.process(m.value(), m.timestamp()[1], raw, m.partition(), m.offset()) for m, _event in written]
    assert normalised(after) == normalised([before])
    assert len(before.routed) == 4 and len(before.rejected) == 2


def test_a_request_is_503_when_any_one_of_its_writes_fails(
    settings: Config, prefix: str, broker: LoopbackBroker
) -> None:
    """librdkafka refuses a message over `message.max.bytes` (set low here); the request that wrote
    it is 503 even though its other event was stored, and the SDK sends the whole batch again."""
    small_limit = settings_for(broker, prefix, partitions=PARTITIONS, KAFKA_MESSAGE_MAX_BYTES="1000")
    collector_settings = CollectorSettings(write_keys=[KEY], ack_timeout_seconds=5)  # type: ignore[list-item]
    small = {"type": "track", "userId": "ada", "event": "Small", "messageId": "small"}
    big = {"type": "track", "userId": "bob", "event": "Big", "messageId": "big", "properties": {"p": "x" * 2000}}
    with CollectorThread(small_limit, collector_settings) as collector:
        refused = requests.post(f"{collector.url}/v1/batch", json={"batch": [small, big]}, auth=(KEY, ""), timeout=30)
        fine = requests.post(f"{collector.url}/v1/batch", json={"batch": [small]}, auth=(KEY, ""), timeout=30)
    assert refused.status_code == 503 and refused.json()["code"] == "unavailable", refused.text
    assert KafkaError(KafkaError.MSG_SIZE_TOO_LARGE).str() in refused.json()["message"]
    assert fine.status_code == 200  # one failed request does not stop the next
    # At-least-once, per event: the first write of the refused request was stored; its retry and
    # the next request store it again, and destinations dedupe the copies by messageId.
    stored = [event["messageId"] for _m, event in raw_events(settle(settings, "raw", timeout=3))]
    assert stored == ["small", "small"]


def test_nothing_is_written_for_a_refused_batch(collector: CollectorThread, settings: Config) -> None:
    """Every 4xx is decided before the first write: one bad event refuses its batch-mates too."""
    good = {"type": "track", "userId": "ada", "event": "Fine"}
    too_big = {"type": "track", "userId": "bob", "event": "Big", "properties": {"p": "x" * 33_000}}
    answers = [
        requests.post(f"{collector.url}/v1/batch", json={"batch": [good, too_big]}, auth=(KEY, ""), timeout=30),
        requests.post(f"{collector.url}/v1/batch", json={"batch": [good, "not an event"]}, auth=(KEY, ""), timeout=30),
    ]
    assert [(a.status_code, a.json()["code"]) for a in answers] == [
        (400, "payload_too_large"),
        (400, "invalid_request"),
    ]
    assert settle(settings, "raw", timeout=2) == []
