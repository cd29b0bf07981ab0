"""Reproduces the embedded broker's fetch stall (docs/ARCHITECTURE.md, gap 11).

Tansu reads a partition's record batches one by one for every fetch, and it answers a fetch whose
reading has not finished within the fetch's `fetch.wait.max.ms` with no records, and no error. So
once a partition holds enough batches, a consumer waiting less than that reading takes is never
served again, at any offset, though its lag grows. This writes `--batches` one-record batches to a
one-partition topic, then fetches the last 100 records with a generous wait (printing how long the
fetch took) and with the short wait given (printing whether anything came back within 15 s).

    .venv/bin/python bench/embedded_fetch_stall.py [--batches 5000 20000 40000 80000] [--wait-ms 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.kafka.broker import EmbeddedBroker, free_port
from worker.kafka.producer import Producer

TAIL = 100
VALUE = b'{"event":"' + b"x" * 1400 + b'"}'


def write_batches(servers: str, topic: str, count: int) -> None:
    # One message a batch: no linger and batch.num.messages 1, as a trickle of events gives.
    producer = Producer({"bootstrap.servers": servers, "linger.ms": 0, "batch.num.messages": 1})
    for number in range(count):
        producer.produce(topic, VALUE, str(number))  # waits for room when librdkafka's queue is full
        producer.poll(0)
    producer.flush(120)


def fetch_tail(servers: str, topic: str, end: int, wait_ms: int, give_up: float) -> tuple[int, float]:
    """How many of the last TAIL records one consumer got, and when the first arrived (s)."""
    consumer = Consumer({"bootstrap.servers": servers, "group.id": "stall-probe", "fetch.wait.max.ms": wait_ms})
    consumer.assign([TopicPartition(topic, 0, end - TAIL)])
    got, first, started = 0, float("nan"), time.monotonic()
    try:
        while got < TAIL and time.monotonic() - started < give_up:
            for message in consumer.consume(TAIL, 0.5):
                if message.error() is None:
                    got += 1
                    if got == 1:
                        first = time.monotonic() - started
    finally:
        consumer.close()
    return got, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[5000, 20000, 40000, 80000])
    parser.add_argument("--wait-ms", type=int, default=10, help="the short fetch wait to try")
    args = parser.parse_args()
    print(f"{'batches':>8} {'first record, 5 s wait':>22} {f'at {args.wait_ms} ms wait':>18}")
    for count in args.batches:
        with EmbeddedBroker(free_port()) as broker:
            servers = broker.bootstrap_servers
            admin = AdminClient({"bootstrap.servers": servers})
            admin.create_topics([NewTopic("stall", 1, 1)])["stall"].result(10)
            write_batches(servers, "stall", count)
            _, generous = fetch_tail(servers, "stall", count, 5000, 30)
            got, _ = fetch_tail(servers, "stall", count, args.wait_ms, 15)
            short = "served" if got == TAIL else f"{got} of {TAIL} in 15 s"
            print(f"{count:>8} {generous * 1000:>19.0f} ms {short:>18}", flush=True)


if __name__ == "__main__":
    main()
