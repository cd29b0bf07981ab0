"""Normaliser throughput against a bare consume -> orjson loads/dumps -> produce loop, one embedded broker, one run.

Both run as their own process with one output per event (DESTINATIONS=amplitude), on the same
200k realistic ~1.5 KB track events, and are timed the same way: by a reader process counting
their output from the first message to the last. Prints both rates and their ratio.

    .venv/bin/python bench/normalize_throughput.py [--events 200000]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from worker.config import Settings
from worker.kafka.admin import TopicSpec, create_topics
from worker.kafka.broker import EmbeddedBroker, free_port
from worker.kafka.producer import Producer
from worker.processes import FAST_GROUP_ENV
from worker.samples import bench_event
from worker.topics import create_all


def bare_loop(bootstrap: str, source: str, target: str, total: int) -> None:
    """The baseline: the same at-least-once shape (store offsets after the write), no Segment work."""
    from confluent_kafka import Consumer as RdConsumer
    from confluent_kafka import Producer as RdProducer

    consumer = RdConsumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-bare",
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": "false",
            **{k.lower()[6:].replace("_", "."): v for k, v in FAST_GROUP_ENV.items()},
        }
    )
    producer = RdProducer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "compression.type": "lz4",
            "enable.idempotence": True,
            "queue.buffering.max.messages": 200000,
        }
    )
    consumer.subscribe([source])
    done = 0
    while done < total:
        messages = consumer.consume(1000, 0.5)
        for message in messages:
            if message.error():
                continue
            event = orjson.loads(message.value())
            while True:
                try:
                    producer.produce(target, orjson.dumps(event), message.key())
                    break
                except BufferError:
                    producer.poll(0.05)
            done += 1
        producer.poll(0)
        if messages:
            producer.flush()
            consumer.store_offsets(messages[-1])
    producer.flush()
    consumer.close()


def count_rate(bootstrap: str, topic: str, total: int, timeout: float) -> float:
    """Events/s between the first and the last output message."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-count-{topic}", "enable.auto.commit": "false"}
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    seen, first, last = 0, None, None
    deadline = time.monotonic() + timeout
    while seen < total and time.monotonic() < deadline:
        messages = consumer.consume(5000, 0.5)
        if messages:
            now = time.monotonic()
            first = first or now
            last = now
            seen += sum(1 for m in messages if m.error() is None)
    consumer.close()
    if seen < total or first is None or last is None or last == first:
        raise SystemExit(f"only {seen}/{total} output messages on {topic} within {timeout}s")
    return seen / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bare-worker", nargs=3, metavar=("BOOTSTRAP", "SOURCE", "TARGET"))
    args = parser.parse_args()
    if args.bare_worker:
        bare_loop(*args.bare_worker, args.events)
        return

    with EmbeddedBroker(free_port()) as broker:
        settings = Settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            topic_prefix="bench.",
            consumer_group_prefix="bench-",
            topic_partitions=args.partitions,
        )
        create_all(settings)
        create_topics(settings.kafka_properties, [TopicSpec("bench.bare", args.partitions, {})])
        rng = random.Random(7)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
        sizes = 0
        for n in range(args.events):
            event = bench_event(rng, n)
            value = orjson.dumps(event)
            sizes += len(value)
            producer.produce("bench.raw", value, event["userId"], lambda err, _m: None)
        producer.flush(60)
        print(f"{args.events} events, mean {sizes / args.events:.0f} bytes, {args.partitions} partitions")

        here = os.path.abspath(__file__)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, **FAST_GROUP_ENV}
        bare = subprocess.Popen(
            [
                sys.executable,
                here,
                "--events",
                str(args.events),
                "--bare-worker",
                broker.bootstrap_servers,
                "bench.raw",
                "bench.bare",
            ],
            env=env,
        )
        try:
            bare_rate = count_rate(broker.bootstrap_servers, "bench.bare", args.events, 300)
        finally:
            bare.wait(60)
        print(f"bare consume -> loads/dumps -> produce: {bare_rate:,.0f} events/s")

        worker_env = {**env, "TOPIC_PREFIX": "bench.", "CONSUMER_GROUP_PREFIX": "bench-", "DESTINATIONS": "amplitude"}
        normaliser = subprocess.Popen(
            [sys.executable, "-m", "worker", "--log-level", "WARNING", "normalize"], env=worker_env
        )
        try:
            normalise_rate = count_rate(broker.bootstrap_servers, "bench.dest.amplitude", args.events, 300)
        finally:
            normaliser.terminate()
            normaliser.wait(60)
        print(f"normaliser (validate, ids, skew, geo, UA, route, Avro): {normalise_rate:,.0f} events/s")
        print(f"ratio normaliser/bare: {normalise_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
