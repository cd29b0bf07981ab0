"""Normaliser throughput against a bare loop and a plain-loop peer, on realistic traffic.

The events (worker/samples.py `realistic_event`: ~1.5 KB analytics.js track events from 5,000
users, each mostly on their own public IPv4, ~1,500 distinct user agents in a Zipf mix) are
written once to a raw topic (6 partitions by default). Three consumers then read all of it, one
after the other, each as its own process with one output per event, each timed the same way (a
reader in this process counts its output from the first message to the last):

- bare: consume -> orjson loads/dumps -> produce, offsets stored after the flush (no Segment work);
- plain: bench/plain_normaliser.py, the afternoon's loop: ids, skew, geo + UA behind lru_caches, JSON;
- product: `segment-worker normalize` with DESTINATIONS=amplitude (validation, deterministic ids,
  skew, identity map, geo + UA, routing, Avro encoding).

Prints each rate, its ratio to the bare loop and product/plain; `--runs N` repeats the three side
by side and ends with the medians. Then the product's geo and UA cache hit rates on this traffic,
from its own Normaliser run in-process on the same events. `--broker both` does everything on the
embedded broker, then on Apache Kafka, and ends with one summary line per broker.

    .venv/bin/python bench/normalize_throughput.py [--events 200000] [--runs 1] [--partitions 6]
        [--broker embedded|apache-kafka|both]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from confluent_kafka import TopicPartition

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for brokers, this script's neighbour

from brokers import add_broker_option, bench_config, client_workarounds, describe, on_each_broker
from profiling import start_profiler, stop_profiler

from worker.config import Settings, kafka_properties
from worker.dlq.inspect import Ends
from worker.kafka.admin import TopicSpec, create_topics
from worker.kafka.broker import LoopbackBroker
from worker.kafka.clients import KafkaClients
from worker.kafka.reading import read_batches_until_quiet
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.normalize.user_agent import UserAgentEnricher
from worker.samples import REALISTIC_USERS, USER_AGENT_POOL, realistic_event
from worker.topics import create_all

REPO = Path(__file__).resolve().parent.parent
PLAIN = Path(__file__).resolve().with_name("plain_normaliser.py")
SEED = 7
SIDES = ("bare", "plain", "product")
LABELS = {
    "bare": "bare     consume -> loads/dumps -> produce",
    "plain": "plain    ids, skew, geo + UA (lru_cache), JSON",
    "product": "product  segment-worker normalize (+ validation, identities, Avro)",
}


def raw_events(count: int) -> Iterator[tuple[str, bytes]]:
    """(key, value) of the bench's events: the same `count` events on every call (seeded)."""
    rng = random.Random(SEED)
    for n in range(count):
        event = realistic_event(rng, n)
        yield event["userId"], orjson.dumps(event)


def bare_loop(bootstrap: str, source: str, target: str, total: int, broker_kind: str, group: str) -> None:
    """The baseline: the same at-least-once shape (store offsets after the write), no Segment work."""
    from confluent_kafka import Consumer as RdConsumer
    from confluent_kafka import Producer as RdProducer

    consumer = RdConsumer(
        {
            **kafka_properties(client_workarounds(broker_kind), bootstrap),  # what only this broker needs
            "group.id": group,
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
        # One offset per partition: a batch spans several, and storing only the last message's
        # would leave the others' progress unstored.
        next_offsets: dict[tuple[str, int], int] = {}
        for message in messages:
            if message.error():
                continue
            next_offsets[(message.topic(), message.partition())] = message.offset() + 1
            event = orjson.loads(message.value())
            while True:
                try:
                    producer.produce(target, orjson.dumps(event), message.key())
                    break
                except BufferError:
                    producer.poll(0.05)
            done += 1
        producer.poll(0)
        if next_offsets:
            producer.flush()
            consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()])
    producer.flush()
    consumer.close()


def end_offsets(kafka: KafkaClients, topic: str) -> list[TopicPartition]:
    """Where `topic` ends now: a run counts only what its worker writes after this. Not the bare
    high watermark: the embedded broker under-reports it after multi-message batches (a later run
    would count the earlier run's output); `Ends.now` reads on from it to the real end."""
    return [TopicPartition(topic, p, offset) for p, offset in sorted(Ends.now(kafka, topic).ends.items())]


def timed(
    kafka: KafkaClients,
    topic: str,
    total: int,
    timeout: float,
    start: Callable[[], subprocess.Popen[bytes]],
    exits: bool = True,
) -> float:
    """Start a worker with `start()` and return its events/s between its first and last output
    message on `topic`, counted by a reader assigned at the topic's end before the worker started.
    A worker that `exits` by itself after `total` events is given time to; any other is stopped."""
    consumer = kafka.reader(f"bench-count-{topic}")
    consumer.assign(end_offsets(kafka, topic))
    worker = start()
    seen, first, last = 0, None, None
    try:
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
        try:
            worker.wait(10 if exits and seen >= total else 0)
        except subprocess.TimeoutExpired:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    if seen < total or first is None or last is None or last == first:
        raise SystemExit(f"only {seen}/{total} output messages on {topic} within {timeout}s")
    return seen / (last - first)


@dataclass
class Rates:
    bare: float
    plain: float
    product: float

    def get(self, side: str) -> float:
        return float(getattr(self, side))


def print_rates(rates: Rates, indent: str = "  ") -> None:
    for side in SIDES:
        rate = rates.get(side)
        print(f"{indent}{LABELS[side]:<70} {rate:>9,.0f} events/s  {rate / rates.bare:.2f}x bare")
    print(f"{indent}product / plain: {rates.product / rates.plain:.2f}", flush=True)


def median_rates(runs: list[Rates]) -> Rates:
    """Each side's median rate (the ratios of medians, not medians of ratios)."""
    return Rates(*(statistics.median(r.get(side) for r in runs) for side in SIDES))


def measure(broker: LoopbackBroker, kind: str, args: argparse.Namespace) -> list[Rates]:
    """`args.runs` rounds of bare, plain and product on `broker`, on one raw topic written once."""
    config = bench_config(broker, args.partitions)
    names = config.names
    bare_topic, plain_topic = names.full_topic("bare"), names.full_topic("plain")
    create_all(config)
    create_topics(config.kafka.admin(), [TopicSpec(t, args.partitions, {}) for t in (bare_topic, plain_topic)])
    producer = config.kafka.producer()  # the product's producer: murmur2 on the userId, as the README asks
    size = 0
    for key, value in raw_events(args.events):
        size += len(value)
        producer.produce(names.raw, value, key, lambda err, _m: None)
    producer.flush(120)
    print(
        f"{args.events} events written once to {names.raw}: mean {size / args.events:.0f} bytes, "
        f"{args.partitions} partitions, {REALISTIC_USERS} users, {len(USER_AGENT_POOL)} user agents in the mix"
    )

    env = {**os.environ, **config.sources}  # the sources carry the broker's client workarounds
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    bootstrap = broker.bootstrap_servers
    extra = [f"{k}={v}" for k, v in kafka_properties(client_workarounds(kind), bootstrap).items()]
    timeout = 300 + args.events / 500  # generous: the machine may be busy
    here = os.path.abspath(__file__)
    results: list[Rates] = []
    profilers: list[subprocess.Popen[bytes]] = []  # the product's py-spy, one per run (--profile)
    for run in range(1, args.runs + 1):
        load = os.getloadavg()[0]
        print(f"run {run}/{args.runs} on {describe(kind)} (1-minute load {load:.1f} at the start):", flush=True)

        def bare(run: int = run) -> subprocess.Popen[bytes]:
            command = [here, "--events", str(args.events), "--broker", kind, "--group", f"bench-bare-{run}"]
            return subprocess.Popen(
                [sys.executable, *command, "--bare-worker", bootstrap, names.raw, bare_topic], env=env
            )

        def plain(run: int = run) -> subprocess.Popen[bytes]:
            command = [str(PLAIN), bootstrap, names.raw, plain_topic, "--events", str(args.events)]
            command += ["--group", f"bench-plain-{run}", *(f"-X{p}" for p in extra if not p.startswith("bootstrap."))]
            return subprocess.Popen([sys.executable, *command], env=env)

        def product(run: int = run) -> subprocess.Popen[bytes]:
            # A fresh consumer group per run, so each run reads the raw topic from the start.
            worker_env = {**env, "DESTINATIONS": "amplitude", "CONSUMER_GROUP_PREFIX": f"bench-run{run}-"}
            process = subprocess.Popen(
                [sys.executable, "-m", "worker", "--log-level", "WARNING", "normalize"], env=worker_env
            )
            if args.profile:
                profilers.append(start_profiler(process.pid, args.profile / f"normalize-{kind}-run{run}.txt"))
            return process

        try:
            rates = Rates(
                bare=timed(config.kafka, bare_topic, args.events, timeout, bare),
                plain=timed(config.kafka, plain_topic, args.events, timeout, plain),
                product=timed(config.kafka, names.dest("amplitude"), args.events, timeout, product, exits=False),
            )
        finally:
            while profilers:
                stop_profiler(profilers.pop())
        print_rates(rates)
        results.append(rates)
    if len(results) > 1:
        print(f"median of {len(results)} runs on {describe(kind)}:")
        print_rates(median_rates(results))
    return results


def cache_hit_rates(events: int) -> None:
    """The product's geo and UA cache hit rates on the bench's events, from its own Normaliser
    (sized as the worker's defaults) run in-process on the same events."""
    defaults = Settings.model_fields
    geo = GeoEnricher(None, defaults["ip_cache_size"].default)
    agents = UserAgentEnricher(defaults["ua_cache_size"].default)
    normaliser = Normaliser(["amplitude"], IdentityMap(defaults["identity_cache_size"].default), [geo, agents])
    ips: set[str] = set()
    user_agents: set[str] = set()
    located = routed = 0
    for offset, (_key, value) in enumerate(raw_events(events)):
        result = normaliser.process(value, 0, "bench.raw", 0, offset)
        for out in result.routed:
            routed += 1
            context = out.event["context"]
            ips.add(context["ip"])
            user_agents.add(context["userAgent"])
            located += "location" in context
    geo.close()
    print(f"product caches on these {events} events (its Normaliser in-process, worker default sizes):")
    for name, info, distinct in (
        ("geo (IP)", geo.lookup.cache_info(), len(ips)),
        ("UA", agents.parse.cache_info(), len(user_agents)),
    ):
        hits = info.hits / max(info.hits + info.misses, 1)
        by_keys = 1 - distinct / max(routed, 1)
        print(
            f"  {name:<8} cache: {hits:.1%} hits ({info.hits:,} hits, {info.misses:,} misses, size {info.maxsize:,}; "
            f"lru_cache counters); {distinct:,} distinct keys: 1 - distinct/events = {by_keys:.1%}"
        )
    print(f"  events with a location from the geo database: {located / max(routed, 1):.1%}")
    print("  (the plain loop's two caches key on the same strings with the same size, so they hit alike)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=1, help="rounds of bare, plain and product; medians at the end")
    parser.add_argument("--partitions", type=int, default=6)
    add_broker_option(parser)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the product with py-spy: folded stacks in DIR/normalize-<broker>-run<N>.txt",
    )
    parser.add_argument("--bare-worker", nargs=3, metavar=("BOOTSTRAP", "SOURCE", "TARGET"))
    parser.add_argument("--group", default="bench-bare", help=argparse.SUPPRESS)  # the bare worker's group
    args = parser.parse_args()
    if args.bare_worker:
        if args.broker == "both":
            parser.error("--bare-worker runs on one broker")
        bare_loop(*args.bare_worker, args.events, args.broker, args.group)
        return

    print("plain and bare write JSON; the product also validates each event and encodes it as Avro.")
    results = on_each_broker(
        args.broker, "normalize-bench-", lambda broker, _log_dir: median_rates(measure(broker, broker.kind, args))
    )
    if len(results) > 1:
        print(f"side by side ({'medians of ' + str(args.runs) + ' runs' if args.runs > 1 else 'one run'}):")
        for kind, rates in results.items():
            print(
                f"  {describe(kind)}: bare {rates.bare:,.0f}, "
                f"plain {rates.plain:,.0f} ({rates.plain / rates.bare:.2f}x), "
                f"product {rates.product:,.0f} events/s ({rates.product / rates.bare:.2f}x bare, "
                f"{rates.product / rates.plain:.2f}x plain)"
            )
    cache_hit_rates(args.events)


if __name__ == "__main__":
    main()
