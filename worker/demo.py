"""`segment-worker demo`: the pipeline on one machine with the embedded broker.

Starts the broker, creates the topics, starts the normaliser as a child process, writes sample
traffic (every event type, batch envelopes, poison input) to segment.raw, waits until every event
has come out on its destination topics or in the dead-letter topic, prints what arrived, and stops
everything it started. Exits non-zero if anything went missing.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from worker.avro_codec import EventCodec
from worker.config import Settings
from worker.dead_letters import header_map
from worker.kafka.broker import EmbeddedBroker, free_port
from worker.kafka.producer import Producer
from worker.processes import FAST_GROUP_ENV, Role
from worker.samples import sample_payloads
from worker.tail import decode_value
from worker.topics import create_all


def _say(text: str) -> None:
    print(text, flush=True)


def produce_all(properties: dict[str, str], topic: str, payloads: list[tuple[str, bytes]]) -> None:
    producer = Producer(properties)
    failures: list[str] = []
    for key, value in payloads:
        producer.produce(topic, value, key, lambda err, _m: failures.append(str(err)) if err else None)
    if producer.flush(30) or failures:
        raise RuntimeError(f"could not write sample traffic: {failures[:3]}")


def collect(properties: dict[str, str], topics: list[str], expected: dict[str, int], timeout: float) -> dict[str, list]:
    """Read `topics` from the beginning until each has its expected count (or the timeout)."""
    consumer = Consumer({**properties, "group.id": "segment-demo-reader", "enable.auto.commit": "false"})
    partitions = []
    metadata = consumer.list_topics(timeout=10)
    for topic in topics:
        partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions]
    consumer.assign(partitions)
    seen: dict[str, list] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and any(len(seen[t]) < expected[t] for t in topics):
            for message in consumer.consume(500, 0.2):
                if message.error() is None:
                    seen[message.topic()].append(message)
    finally:
        consumer.close()
    return seen


def run_demo(settings: Settings, keep_running: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="segment-demo-"))
    port = free_port()
    _say(f"[1/5] starting the embedded broker on 127.0.0.1:{port} (logs in {workdir})")
    broker = EmbeddedBroker(port, log_path=workdir / "broker.log").start()
    settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers, "topic_partitions": 3})
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, **FAST_GROUP_ENV}
    roles: list[Role] = []
    try:
        props = settings.kafka_properties
        props["bootstrap.servers"] = broker.bootstrap_servers
        _say("[2/5] creating topics")
        create_all(settings)
        _say("[3/5] starting the normaliser (consumer group segment-normalize)")
        roles.append(Role(["normalize"], env, workdir / "normalize.log"))
        payloads, good, poison = sample_payloads()
        _say(
            f"[4/5] writing {len(payloads)} raw messages ({good} events, {len(poison)} poison) "
            f"to {settings.topic('raw')}"
        )
        produce_all(props, settings.topic("raw"), payloads)
        dest_topics = [settings.topic(f"dest.{d}") for d in settings.destinations]
        dlq = settings.topic("dlq.raw")
        expected = {**dict.fromkeys(dest_topics, good), dlq: len(poison)}
        _say("[5/5] waiting for every event to come out")
        seen = collect(props, [*dest_topics, dlq], expected, timeout=60)
        ok = _report(seen, expected, dest_topics, dlq)
        if keep_running:
            _say(
                f"\nstack is up: KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers} segment-worker tail dest.amplitude "
                f"--from-beginning\nwrite more with kcat -b {broker.bootstrap_servers} -t {settings.topic('raw')} -P; "
                "Ctrl-C to stop"
            )
            try:
                while all(r.alive() for r in roles):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        for role in roles:
            role.terminate()
        broker.stop()


def _report(seen: dict[str, list], expected: dict[str, int], dest_topics: list[str], dlq: str) -> bool:
    codec, ok = EventCodec(), True
    _say("")
    for topic in dest_topics:
        messages = seen[topic]
        types = Counter(decode_value(m.value(), codec)["type"] for m in messages)
        status = "ok" if len(messages) == expected[topic] else "MISSING"
        ok &= status == "ok"
        _say(f"{topic}: {len(messages)}/{expected[topic]} {status}  by type {dict(sorted(types.items()))}")
    if dest_topics and seen[dest_topics[0]]:
        sample = next(
            (m for m in seen[dest_topics[0]] if decode_value(m.value(), codec)["type"] == "track"),
            seen[dest_topics[0]][0],
        )
        _say(f"\nsample from {dest_topics[0]} (key {sample.key().decode()}):")
        _say(orjson.dumps(decode_value(sample.value(), codec), option=orjson.OPT_INDENT_2).decode())
    _say(f"\n{dlq}: {len(seen[dlq])}/{expected[dlq]} dead letters")
    for message in seen[dlq]:
        headers = header_map(message.headers())
        _say(f"  [{headers.get('error_kind')}] {headers.get('error')}")
    ok &= len(seen[dlq]) == expected[dlq]
    _say("\nall events accounted for" if ok else "\nSOME EVENTS ARE MISSING")
    return ok
