"""Normaliser throughput against a bare consume -> orjson loads/dumps -> produce loop, one broker, one run.

Both run as their own process with one output per event (DESTINATIONS=amplitude), on the same
200k realistic ~1.1 KB track events, and are timed the same way: by a reader process counting
their output from the first message to the last. Prints both rates and their ratio; with
`--broker both`, the whole measurement on each broker in turn, then one summary line per broker.

    .venv/bin/python bench/normalize_throughput.py [--events 200000] [--broker embedded|apache-kafka|both]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for brokers, this script's neighbour

from brokers import add_broker_option, bench_config, broker_kinds, client_workarounds, describe, start_broker

from worker.config import kafka_properties
from worker.kafka.admin import TopicSpec, create_topics
from worker.kafka.broker import LoopbackBroker
from worker.kafka.clients import KafkaClients
from worker.kafka.reading import assign_all, read_batches_until_quiet
from worker.samples import bench_event
from worker.topics import create_all


def bare_loop(bootstrap: str, source: str, target: str, total: int, broker_kind: str) -> None:
    """The baseline: the same at-least-once shape (store offsets after the write), no Segment work."""
    from confluent_kafka import Consumer as RdConsumer
    from confluent_kafka import Producer as RdProducer

    consumer = RdConsumer(
        {
            **kafka_properties(client_workarounds(broker_kind), bootstrap),  # what only this broker needs
            "group.id": "bench-bare",
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": "false",
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


def count_rate(kafka: KafkaClients, topic: str, total: int, timeout: float) -> float:
    """Events/s between the first and the last output message."""
    consumer = kafka.reader(f"bench-count-{topic}")
    seen, first, last = 0, None, None
    try:
        assign_all(consumer, [topic])
        # idle=None: stop only at `total` or the deadline (the output may not have started yet).
        for messages in read_batches_until_quiet(consumer, None, time.monotonic() + timeout, batch=5000):
            now = time.monotonic()
            first = first or now
            last = now
            seen += len(messages)
            if seen >= total:
                break
    finally:
        consumer.close()
    if seen < total or first is None or last is None or last == first:
        raise SystemExit(f"only {seen}/{total} output messages on {topic} within {timeout}s")
    return seen / (last - first)


def measure(broker: LoopbackBroker, kind: str, args: argparse.Namespace) -> tuple[float, float]:
    """(bare events/s, normaliser events/s) on `broker`."""
    config = bench_config(broker, args.partitions)
    names = config.names
    bare_topic = names.full_topic("bare")
    create_all(config)
    create_topics(config.kafka.admin(), [TopicSpec(bare_topic, args.partitions, {})])
    rng = random.Random(7)
    producer = config.kafka.producer()
    sizes = 0
    for n in range(args.events):
        event = bench_event(rng, n)
        value = orjson.dumps(event)
        sizes += len(value)
        producer.produce(names.raw, value, event["userId"], lambda err, _m: None)
    producer.flush(60)
    print(f"{args.events} events, mean {sizes / args.events:.0f} bytes, {args.partitions} partitions")

    here = os.path.abspath(__file__)
    env = {**os.environ, **config.sources}  # the sources carry the broker's client workarounds
    bare = subprocess.Popen(
        [
            sys.executable,
            here,
            "--events",
            str(args.events),
            "--broker",
            kind,
            "--bare-worker",
            broker.bootstrap_servers,
            names.raw,
            bare_topic,
        ],
        env=env,
    )
    try:
        bare_rate = count_rate(config.kafka, bare_topic, args.events, 300)
    finally:
        bare.wait(60)
    print(f"bare consume -> loads/dumps -> produce: {bare_rate:,.0f} events/s")

    worker_env = {**env, "DESTINATIONS": "amplitude"}
    normaliser = subprocess.Popen(
        [sys.executable, "-m", "worker", "--log-level", "WARNING", "normalize"], env=worker_env
    )
    try:
        normalise_rate = count_rate(config.kafka, names.dest("amplitude"), args.events, 300)
    finally:
        normaliser.terminate()
        normaliser.wait(60)
    print(f"normaliser (validate, ids, skew, geo, UA, route, Avro): {normalise_rate:,.0f} events/s")
    print(f"ratio normaliser/bare: {normalise_rate / bare_rate:.2f}", flush=True)
    return bare_rate, normalise_rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    add_broker_option(parser)
    parser.add_argument("--bare-worker", nargs=3, metavar=("BOOTSTRAP", "SOURCE", "TARGET"))
    args = parser.parse_args()
    if args.bare_worker:
        if args.broker == "both":
            parser.error("--bare-worker runs on one broker")
        bare_loop(*args.bare_worker, args.events, args.broker)
        return

    log_dir = Path(tempfile.mkdtemp(prefix="normalize-bench-"))
    results: dict[str, tuple[float, float]] = {}
    ok = False
    try:
        for kind in broker_kinds(args.broker):
            broker = start_broker(kind, log_dir)
            try:
                results[kind] = measure(broker, kind, args)
            finally:
                broker.stop()
        ok = True
    finally:
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"broker logs kept in {log_dir}", file=sys.stderr)
    if len(results) > 1:
        print("side by side (one run):")
        for kind, (bare_rate, normalise_rate) in results.items():
            print(
                f"  {describe(kind)}: bare {bare_rate:,.0f} events/s, normaliser {normalise_rate:,.0f} events/s, "
                f"ratio {normalise_rate / bare_rate:.2f}"
            )


if __name__ == "__main__":
    main()
