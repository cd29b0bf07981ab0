"""Behaviour the embedded broker cannot show, asserted where it is real (Apache Kafka).

On the embedded broker each of these is skipped with the measured reason (docs/BROKERS.md): the
test would be checking Tansu's defect, not our code.
"""

from __future__ import annotations

import re
import time
import urllib.request

import orjson
import pytest
from confluent_kafka import TopicPartition

from tests.kafka_helpers import produce, read, settings_for, setup_topics, start_role
from worker.avro_codec import EventCodec
from worker.kafka.broker import free_port
from worker.kafka.reading import partitions_of
from worker.names import NORMALIZE_ROLE

pytestmark = pytest.mark.integration

TANSU_WATERMARK = "embedded broker: its high watermark is wrong after multi-message batches (docs/BROKERS.md)"
TANSU_WEDGE = "embedded broker: a member leaving mid-rebalance wedges the group (docs/BROKERS.md)"


def _events(start: int, count: int) -> list[tuple[str, bytes]]:
    return [
        (
            f"user-{i % 40}",
            orjson.dumps({"type": "track", "userId": f"user-{i % 40}", "event": "E", "messageId": f"b{i}"}),
        )
        for i in range(start, start + count)
    ]


def _ids(messages) -> set[str]:
    codec = EventCodec()
    return {codec.decode(m.value())[0]["messageId"] for m in messages}


def _lag_lines(port: int) -> dict[int, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r'segment_worker_consumer_lag\{partition="(\d+)",topic="[^"]+"\} ([0-9.e+-]+)', text)
    }


def test_exported_lag_is_the_high_watermark_minus_the_committed_offset(broker, prefix, tmp_path) -> None:
    if broker.kind == "embedded":
        pytest.skip(TANSU_WATERMARK)
    config = settings_for(broker, prefix, partitions=3)
    setup_topics(config)
    produce(config, "raw", _events(0, 900))  # multi-message batches: what Tansu gets wrong
    port = free_port()
    role = start_role(
        config,
        ["normalize"],
        tmp_path,
        DESTINATIONS="amplitude",
        METRICS_PORT=str(port),
        KAFKA_STATISTICS_INTERVAL_MS="300",
    )
    try:
        assert _ids(read(config, "dest.amplitude", lambda seen: len(seen) >= 900, timeout=60)) == {
            f"b{i}" for i in range(900)
        }
        deadline = time.monotonic() + 30
        lag = {}
        while time.monotonic() < deadline:
            lag = _lag_lines(port)
            if len(lag) == 3 and not any(lag.values()):
                break
            time.sleep(0.3)
        assert lag == {0: 0.0, 1: 0.0, 2: 0.0}
        consumer = config.kafka.consumer(NORMALIZE_ROLE, {"enable.auto.commit": "false"})
        try:
            topic = config.names.raw
            partitions = [TopicPartition(topic, p) for p in partitions_of(consumer, topic)]
            committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
            high = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        finally:
            consumer.close()
        assert committed == high and sum(high.values()) == 900  # exact: every produced message counted once
    finally:
        assert role.terminate() == 0


def test_a_member_leaving_mid_rebalance_does_not_wedge_the_group(broker, prefix, tmp_path) -> None:
    """A alone, B joins, then C joins and A leaves within a second: B and C end up with every
    partition and nothing is lost (the sequence that wedges a Tansu group for good)."""
    if broker.kind == "embedded":
        pytest.skip(TANSU_WEDGE)
    config = settings_for(broker, prefix, partitions=6)
    setup_topics(config)
    produce(config, "raw", _events(0, 3000))
    a = start_role(config, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    b = c = None
    try:
        read(config, "dest.amplitude", lambda seen: len(seen) >= 500, timeout=60)
        b = start_role(config, ["normalize"], tmp_path, DESTINATIONS="amplitude")
        time.sleep(0.5)
        c = start_role(config, ["normalize"], tmp_path, DESTINATIONS="amplitude")
        time.sleep(0.5)
        assert a.terminate() == 0  # leaves while the group is rebalancing for B and C
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all("partitions assigned" in m.log_path.read_text() for m in (b, c)):
            time.sleep(0.2)
        assert all("partitions assigned" in m.log_path.read_text() for m in (b, c)), "the group is wedged"
        produce(config, "raw", _events(3000, 3000))
        messages = read(config, "dest.amplitude", lambda seen: len(_ids(seen)) >= 6000, timeout=90)
        assert _ids(messages) == {f"b{i}" for i in range(6000)}
        assert b.alive() and c.alive()
    finally:
        for member in (a, b, c):
            if member is not None:
                assert member.terminate() == 0
