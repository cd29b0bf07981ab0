"""Sink throughput: events/s a sink delivers into the local stand-in destination, one broker, one run.

100k realistic normalised track events (the ~1.3 KB Avro records the normaliser writes: ecommerce
properties, full web context, geo + UA enrichment, a few hundred users) are written to
`segment.dest.<dest>` before the sink starts, so the sink always has a full backlog and what is
timed is the sink alone: consume, Avro decode, map, batch, HTTP to the stand-in, store offsets.
The stand-in runs as its own process; the rate is read from its `/stats` (deduped `received`),
polled every 0.2 s, from the first poll that sees a delivered event to the one that sees all.

Amplitude's events-per-second limit is lifted (AMPLITUDE_EVENTS_PER_SECOND) so the rate limit is not
what is measured; every SINK_* setting is the default. Amberflo is run too, for contrast: it takes
100 records a request where Amplitude takes 1000. `--broker both` runs everything on the embedded
broker, then on Apache Kafka, in one invocation, and ends with one summary line per broker.

    .venv/bin/python bench/sink_throughput.py [--events 100000] [--destinations amplitude,amberflo]
        [--broker embedded|apache-kafka|both] [--compare-order]

`--compare-order` runs each sink a second time with SINK_PER_USER_ORDER=false on the same backlog
(a fresh consumer group, the stand-in reset) and prints what per-user order costs.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for brokers, this script's neighbour

from brokers import GROUP_PREFIX, PREFIX, add_broker_option, bench_config, describe, on_each_broker

from worker.config import Config
from worker.destinations import registry
from worker.kafka.broker import LoopbackBroker, free_port, wait_for_port
from worker.kafka.clients import KafkaClients
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.normalize.user_agent import UserAgentEnricher
from worker.processes import Role
from worker.samples import bench_event
from worker.segment.timestamps import iso_from_millis
from worker.standins.server import standin_env
from worker.topics import create_all

REPO = Path(__file__).resolve().parent.parent
AMPLITUDE_TARGET = 40_000  # events/s: issue 12's target for one Amplitude sink process, rate limit lifted
BASE_MS = 1_795_000_000_000  # 2026-11-18, an arbitrary fixed "now" so runs are reproducible
POLL_SECONDS = 0.2
RAW_TOPIC = f"{PREFIX}raw"


# -- events --------------------------------------------------------------------------------------


def normalised_events(
    count: int, users: int, seed: int = 7, start: int = 0, destinations: tuple[str, ...] = ("amplitude",)
) -> Iterator[tuple[str, bytes, str]]:
    """(key, Avro record, messageId) for `count` track events, as the normaliser writes them to dest topics.

    They go through the real normaliser (validation, timestamps, ids, geo and UA enrichment, Avro),
    so the records have exactly the documented dest-topic shape, not a hand-made imitation of it.
    """
    rng = random.Random(seed + start)
    normaliser = Normaliser(list(destinations), IdentityMap(users * 2), [GeoEnricher(), UserAgentEnricher()])
    for n in range(start, start + count):
        raw = bench_event(rng, n)
        user = f"user-{rng.randrange(users):04d}"  # a few hundred users, not bench_event's 5000
        sent_ms = BASE_MS + n * 10
        raw.update(
            userId=user,
            anonymousId=f"anon-{user}",
            messageId=f"bench-{n:09d}",  # unique: the stand-ins dedupe on it
            timestamp=iso_from_millis(sent_ms - rng.randrange(50, 2000)),
            sentAt=iso_from_millis(sent_ms),
        )
        # Where the record would have been read from (only events without a messageId derive one from it).
        result = normaliser.process(orjson.dumps(raw), sent_ms + rng.randrange(20, 400), RAW_TOPIC, 0, n)
        if len(result.routed) != 1:
            raise SystemExit(f"the normaliser did not route bench event {n}: {result}")
        routed = result.routed[0]
        yield routed.key, routed.value, routed.event["messageId"]


def write_events(kafka: KafkaClients, topics: list[str], count: int, users: int) -> float:
    """Write the same `count` events to each topic; returns their mean size in bytes."""
    producer = kafka.producer()
    errors: list[str] = []

    def failed(error: Any, _message: Any) -> None:
        if error is not None:
            errors.append(str(error))

    size = 0
    for key, value, _id in normalised_events(count, users):
        size += len(value)
        for topic in topics:
            producer.produce(topic, value, key, failed)
    if producer.flush(120) or errors:
        raise SystemExit(f"could not write the bench events: {errors[:3]}")
    return size / max(count, 1)


# -- processes -----------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Children run `python -m worker`: they need the repo on their path wherever we were started."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


class StandinServer:
    """`segment-worker standins` as a child process, and the two control calls the benches need."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.role = Role(["standins", "--port", str(self.port)], child_env(), log_dir / "standins.log")
        wait_for_port("127.0.0.1", self.port, 20)

    def env(self) -> dict[str, str]:
        """What a sink needs to talk to these stand-ins (base URLs and the keys they accept)."""
        return standin_env(self.base)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return orjson.loads(response.read())

    def stats(self, destination: str) -> dict[str, Any]:
        return self.call("GET", f"/_standin/{destination}/stats")  # type: ignore[no-any-return]

    def faults(self, destination: str, **faults: Any) -> None:
        self.call("POST", f"/_standin/{destination}/faults", faults)


def start_sink(config: Config, destination: str, standins: StandinServer, log_dir: Path, **extra: str) -> Role:
    """`sink <destination>` for `config` (from `brokers.bench_config`: its sources carry the broker's client
    workarounds); the stand-ins' env carries the API key the sink refuses to start without."""
    env = {
        **child_env(),
        **config.sources,
        **standins.env(),
        **extra,
    }
    log_path = log_dir / f"sink-{destination}.log"
    return Role(["--log-level", "WARNING", "sink", destination], env, log_path)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc), to see who was the bottleneck."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- measurement ---------------------------------------------------------------------------------


@dataclass
class Run:
    rate: float  # events/s from the first poll that saw a delivery to the one that saw all
    seconds: float
    requests: int
    duplicates: int
    cpu: dict[str, float]  # process -> share of one core during the timed window


def measure(
    standins: StandinServer, destination: str, total: int, sink: Role, watched: dict[str, int], timeout: float
) -> Run:
    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None
    cpu_start: dict[str, float] = {}
    stats = standins.stats(destination)
    while stats["received"] < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"{destination}: only {stats['received']}/{total} delivered within {timeout:.0f}s")
        if not sink.alive():
            raise SystemExit(f"{destination}: the sink exited ({sink.process.returncode}); see {sink.log_path}")
        time.sleep(POLL_SECONDS)
        stats = standins.stats(destination)
        if first is None and stats["received"] > 0:
            first = (time.monotonic(), stats["received"])
            cpu_start = {name: cpu_seconds(pid) for name, pid in watched.items()}
    end = time.monotonic()
    if first is None or end <= first[0]:
        raise SystemExit(f"{destination}: all {total} arrived within one poll; use more --events")
    seconds = end - first[0]
    cpu = {name: (cpu_seconds(pid) - cpu_start[name]) / seconds for name, pid in watched.items()}
    return Run((stats["received"] - first[1]) / seconds, seconds, stats["requests"], stats["duplicates"], cpu)


def run_destination(
    config: Config,
    destination: str,
    standins: StandinServer,
    broker_pid: int,
    args: argparse.Namespace,
    log_dir: Path,
    per_user_order: bool = True,
) -> Run:
    # The rate limit is lifted so the sink's own throughput is what is measured. Each run reads the
    # backlog from the start in a consumer group of its own, into a stand-in that forgot the last one.
    standins.call("POST", f"/_standin/{destination}/reset", {})
    mode = "ordered" if per_user_order else "unordered"
    sink = start_sink(
        config,
        destination,
        standins,
        log_dir,
        AMPLITUDE_EVENTS_PER_SECOND="100000000",
        SINK_PER_USER_ORDER=str(per_user_order).lower(),
        CONSUMER_GROUP_PREFIX=f"{GROUP_PREFIX}{mode}-",
    )
    profiler = start_profiler(sink.pid, args.profile / f"sink-{destination}-{mode}.txt") if args.profile else None
    try:
        watched = {"sink": sink.pid, "stand-in": standins.role.pid, "broker": broker_pid}
        return measure(standins, destination, args.events, sink, watched, args.timeout)
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        sink.terminate()


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the sink for the whole run, its folded stacks written to `output` when stopped."""
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "--pid", str(pid), "--rate", "250", "--gil", "--format", "raw", "-o", str(output)]
    print(f"  profiling the sink into {output}")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


def report(destination: str, run: Run, events: int) -> None:
    line = f"{destination} sink: {run.rate:,.0f} events/s"
    if destination == "amplitude":
        line += f" ({run.rate / AMPLITUDE_TARGET:.2f}x the {AMPLITUDE_TARGET // 1000}k target)"
    print(line)
    cpu = ", ".join(f"{name} {share:.0%}" for name, share in run.cpu.items())
    print(
        f"  {events:,} events in {run.seconds:.1f}s, {run.requests:,} requests "
        f"({events / max(run.requests, 1):.0f} events each), {run.duplicates} duplicates; CPU of one core: {cpu}"
    )


def run_broker(
    broker: LoopbackBroker, destinations: list[str], args: argparse.Namespace, log_dir: Path
) -> dict[str, Run]:
    """Every destination's run on `broker`, from one backlog written before the first sink starts."""
    assert broker.process is not None
    config = bench_config(broker, args.partitions)
    create_all(config)
    topics = [config.names.dest(d) for d in destinations]
    mean = write_events(config.kafka, topics, args.events, args.users)
    print(
        f"{args.events:,} normalised track events, mean {mean:.0f} bytes Avro, {args.users} users, "
        f"{args.partitions} partitions, written before each sink starts"
    )
    standins = StandinServer(log_dir)
    runs: dict[str, Run] = {}
    try:
        for destination in destinations:
            runs[destination] = run_destination(config, destination, standins, broker.process.pid, args, log_dir)
            report(destination, runs[destination], args.events)
            if args.compare_order:
                unordered = run_destination(
                    config, destination, standins, broker.process.pid, args, log_dir, per_user_order=False
                )
                report(f"{destination} (SINK_PER_USER_ORDER=false)", unordered, args.events)
                print(
                    f"  per-user order costs {1 - runs[destination].rate / unordered.rate:+.0%} of the unordered "
                    f"rate ({runs[destination].rate:,.0f} vs {unordered.rate:,.0f} events/s, same backlog, same run)"
                )
    finally:
        standins.role.terminate()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--destinations", default="amplitude,amberflo")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per destination before giving up")
    parser.add_argument(
        "--compare-order",
        action="store_true",
        help="also run each sink with SINK_PER_USER_ORDER=false, and print what the ordering costs",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each sink with py-spy while it is timed: folded stacks in DIR/sink-<destination>-<mode>.txt",
    )
    add_broker_option(parser)
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    destinations = [d.strip() for d in args.destinations.split(",") if d.strip()]
    unknown = sorted(set(destinations) - set(registry.names()))
    if unknown:
        parser.error(f"unknown destinations {unknown}; known: {', '.join(registry.names())}")

    results = on_each_broker(
        args.broker, "sink-bench-", lambda broker, log_dir: run_broker(broker, destinations, args, log_dir)
    )
    if len(results) > 1:
        print("side by side (one run):")
        for kind, runs in results.items():
            rates = ", ".join(f"{d} {run.rate:,.0f} events/s" for d, run in runs.items())
            print(f"  {describe(kind)}: {rates}")


if __name__ == "__main__":
    main()
