"""Sink throughput: events/s a sink delivers into the local stand-in destination, one broker at a time;
for Amplitude, side by side with a plain-loop peer (bench/plain_sink.py).

100k normalised track events are written to `segment.dest.<dest>` before the sink starts, so the
sink always has a full backlog and what is timed is the sink alone: consume, Avro decode, map,
batch, HTTP to the stand-in, store offsets. `--traffic` says which events:

- realistic (the default): the normaliser bench's traffic (worker/samples.py `realistic_event`:
  ~1.5 KB analytics.js track events from 5,000 users, ~1,500 user agents in a Zipf mix, each user
  mostly on their own public IPv4), passed through the real Normaliser, so the records are the
  ~1.7 KB Avro records it writes (ecommerce properties, full web context, geo + UA enrichment);
- bench: the earlier traffic (`bench_event`, ten IPs, six user agents, `--users` users, 500 by
  default), through the same Normaliser.

The stand-in runs as its own process; the rate is read from its `/stats` (deduped `received`),
polled every 0.2 s, from the first poll that sees a delivered event to the one that sees all.

Amplitude's events-per-second limit is lifted (AMPLITUDE_EVENTS_PER_SECOND) so the rate limit is not
what is measured; every SINK_* setting is the default. For Amplitude the same backlog is then
delivered by bench/plain_sink.py, the afternoon's loop (consume -> fastavro -> plain mapping ->
1000-event requests POSTed one at a time over one keep-alive connection -> store offsets), as its
own process, in a fresh consumer group into a reset stand-in, timed the same way; the script prints
its rate and product / plain. Amberflo is run too, for contrast: it takes 100 records a request
where Amplitude takes 1000. `--broker both` runs everything on the embedded broker, then on Apache
Kafka, in one invocation, and ends with one summary line per broker.

    .venv/bin/python bench/sink_throughput.py [--events 100000] [--destinations amplitude,amberflo]
        [--traffic realistic|bench] [--broker embedded|apache-kafka|both] [--runs 1] [--compare-order]
        [--profile DIR]

`--runs N` repeats every side (each destination, then the plain loop) N times on the same backlog,
each run in fresh consumer groups into a reset stand-in, and ends with each side's median rate and
the ratio of the medians.

`--compare-order` runs each sink a second time with SINK_PER_USER_ORDER=false on the same backlog
(a fresh consumer group, the stand-in reset) and prints what per-user order costs. `--profile DIR`
records each sink (the plain loop too) with py-spy while it is timed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
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

from brokers import GROUP_PREFIX, PREFIX, add_broker_option, bench_config, client_workarounds, describe, on_each_broker
from profiling import profiled

from worker.config import Config, kafka_properties
from worker.destinations import registry
from worker.kafka.broker import LoopbackBroker, free_port, wait_for_port
from worker.kafka.clients import KafkaClients
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.normalize.user_agent import UserAgentEnricher
from worker.processes import Role
from worker.samples import REALISTIC_USERS, USER_AGENT_POOL, bench_event, realistic_event
from worker.segment.timestamps import iso_from_millis
from worker.standins.server import default_key, standin_env
from worker.topics import create_all

REPO = Path(__file__).resolve().parent.parent
PLAIN_SINK = Path(__file__).resolve().with_name("plain_sink.py")
PLAIN = "amplitude plain loop"  # the plain loop's key among a broker's runs
AMPLITUDE_TARGET = 40_000  # events/s: issue 12's target for one Amplitude sink process, rate limit lifted
BASE_MS = 1_795_000_000_000  # 2026-11-18, an arbitrary fixed "now" so runs are reproducible
POLL_SECONDS = 0.2
RAW_TOPIC = f"{PREFIX}raw"
TRAFFIC = ("realistic", "bench")


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
        yield routed_once(normaliser, raw, sent_ms + rng.randrange(20, 400), n, "bench")


def realistic_normalised_events(count: int, seed: int = 7) -> Iterator[tuple[str, bytes, str]]:
    """(key, Avro record, messageId) for `count` of the normaliser bench's events (`realistic_event`:
    5,000 users, ~1,500 user agents, varied IPs), through the real normaliser as `normalised_events`.

    The events keep their own users, ids and clocks; the few without a messageId get one derived from
    where they would have been read (unique: one offset each).
    """
    rng = random.Random(seed)
    normaliser = Normaliser(["amplitude"], IdentityMap(REALISTIC_USERS * 2), [GeoEnricher(), UserAgentEnricher()])
    for n in range(count):
        raw = realistic_event(rng, n)
        kafka_ms = BASE_MS + n * 5 + 400  # used only by an event without receivedAt; these all have one
        yield routed_once(normaliser, raw, kafka_ms, n, "realistic")


def routed_once(normaliser: Normaliser, raw: dict, kafka_ms: int, offset: int, traffic: str) -> tuple[str, bytes, str]:
    """(key, Avro record, messageId) of `raw` through the normaliser, read as if from `segment.raw`
    partition 0 at `offset` (only an event without a messageId derives one from it)."""
    result = normaliser.process(orjson.dumps(raw), kafka_ms, RAW_TOPIC, 0, offset)
    if len(result.routed) != 1:
        raise SystemExit(f"the normaliser did not route {traffic} event {offset}: {result}")
    routed = result.routed[0]
    return routed.key, routed.value, routed.event["messageId"]


def describe_traffic(traffic: str, users: int) -> str:
    if traffic == "realistic":
        return (
            f"realistic_event traffic: {REALISTIC_USERS:,} users, {len(USER_AGENT_POOL):,} user agents "
            "in a Zipf mix, each user mostly on their own public IPv4"
        )
    return f"bench_event traffic: {users} users, ten IPs, six user agents"


def write_events(kafka: KafkaClients, topics: list[str], count: int, users: int, traffic: str = "bench") -> float:
    """Write the same `count` events of `traffic` to each topic; returns their mean size in bytes."""
    producer = kafka.producer()
    errors: list[str] = []

    def failed(error: Any, _message: Any) -> None:
        if error is not None:
            errors.append(str(error))

    size = 0
    events = realistic_normalised_events(count) if traffic == "realistic" else normalised_events(count, users)
    for key, value, _id in events:
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


def start_sink(
    config: Config, destination: str, standins: StandinServer, log_dir: Path, processes: int = 1, **extra: str
) -> Role:
    """`sink <destination>` for `config` (from `brokers.bench_config`: its sources carry the broker's client
    workarounds); the stand-ins' env carries the API key the sink refuses to start without."""
    env = {
        **child_env(),
        **config.sources,
        **standins.env(),
        **extra,
    }
    log_path = log_dir / f"sink-{destination}.log"
    return Role(["--log-level", "WARNING", "sink", destination, "--processes", str(processes)], env, log_path)


class PlainSink(Role):
    """bench/plain_sink.py as a child process, stopped by its PID like a role (it also stops by itself)."""

    program = (str(PLAIN_SINK),)


def start_plain_sink(
    config: Config, kind: str, standins: StandinServer, args: argparse.Namespace, log_dir: Path, tag: str
) -> Role:
    """The plain loop on the Amplitude dest topic, with the broker's client workarounds as -X overrides."""
    bootstrap = config.settings.kafka_bootstrap_servers
    overrides = [f"-X{k}={v}" for k, v in kafka_properties(client_workarounds(kind), bootstrap).items()]
    command = [bootstrap, config.names.dest("amplitude"), standins.base, default_key("amplitude")]
    command += ["--events", str(args.events), "--group", f"{GROUP_PREFIX}plain-sink-amplitude{tag}"]
    command += ["--deadline", str(args.timeout + 30), *(o for o in overrides if not o.startswith("-Xbootstrap."))]
    return PlainSink(command, child_env(), log_dir / "plain-sink-amplitude.log")


def cpu_seconds(pid: int, gone: float = 0.0) -> float:
    """User + system CPU time of a process and its live children so far (from /proc: a `--processes N`
    sink's members are its children), to see who was the bottleneck; `gone` for a process already reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return gone
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        children = []
    return own + sum(cpu_seconds(int(child)) for child in children)


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
    cpu_now: dict[str, float] = {}
    while True:
        stats = standins.stats(destination)
        now = time.monotonic()
        # Read before `alive()` can reap a sink that stopped by itself (the plain loop does, once it
        # delivered everything): a zombie's /proc/<pid>/stat still holds its CPU time; once reaped,
        # its last reading stands.
        cpu_now = {name: cpu_seconds(pid, cpu_now.get(name, 0.0)) for name, pid in watched.items()}
        if first is None and stats["received"] > 0:
            first = (now, stats["received"])
            cpu_start = cpu_now
        if stats["received"] >= total:
            break
        if now > deadline:
            raise SystemExit(f"{destination}: only {stats['received']}/{total} delivered within {timeout:.0f}s")
        if not sink.alive():
            # It may have delivered the last request between the poll above and its exit.
            if standins.stats(destination)["received"] >= total:
                continue
            raise SystemExit(f"{destination}: the sink exited ({sink.process.returncode}); see {sink.log_path}")
        time.sleep(POLL_SECONDS)
    end = now
    if first is None or end <= first[0]:
        raise SystemExit(f"{destination}: all {total} arrived within one poll; use more --events")
    seconds = end - first[0]
    cpu = {name: (cpu_now[name] - cpu_start[name]) / seconds for name in watched}
    return Run((stats["received"] - first[1]) / seconds, seconds, stats["requests"], stats["duplicates"], cpu)


def run_destination(
    config: Config,
    destination: str,
    standins: StandinServer,
    broker_pid: int,
    args: argparse.Namespace,
    log_dir: Path,
    tag: str,
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
        args.processes,
        AMPLITUDE_EVENTS_PER_SECOND="100000000",
        SINK_PER_USER_ORDER=str(per_user_order).lower(),
        CONSUMER_GROUP_PREFIX=f"{GROUP_PREFIX}{mode}{tag}-",
    )
    return timed_run(sink, destination, f"sink-{destination}-{mode}{tag}", standins, broker_pid, args, log_dir)


def timed_run(
    sink: Role,
    destination: str,
    name: str,
    standins: StandinServer,
    broker_pid: int,
    args: argparse.Namespace,
    log_dir: Path,
) -> Run:
    """`measure` a started sink (under py-spy with --profile, into DIR/<broker>/<name>.txt), then stop it."""
    # Profiles go in a folder per broker (log_dir is the broker kind's): --broker both keeps both.
    profile = args.profile / log_dir.name / f"{name}.txt" if args.profile else None
    try:
        with profiled(sink.pid, profile):
            watched = {"sink": sink.pid, "stand-in": standins.role.pid, "broker": broker_pid}
            return measure(standins, destination, args.events, sink, watched, args.timeout)
    finally:
        sink.terminate()


def run_plain(
    config: Config,
    kind: str,
    standins: StandinServer,
    broker_pid: int,
    args: argparse.Namespace,
    log_dir: Path,
    tag: str,
) -> Run:
    """bench/plain_sink.py on the Amplitude backlog, as `run_destination` runs the product's sink: its
    own consumer group from the start, into a stand-in that forgot the last run, timed by `measure`."""
    standins.call("POST", "/_standin/amplitude/reset", {})
    sink = start_plain_sink(config, kind, standins, args, log_dir, tag)
    return timed_run(sink, "amplitude", f"sink-amplitude-plain{tag}", standins, broker_pid, args, log_dir)


def report(destination: str, run: Run, events: int, processes: int = 1) -> None:
    line = f"{destination} sink: {run.rate:,.0f} events/s"
    if processes > 1:
        line += f" from {processes} processes, {run.rate / processes:,.0f} a process"
    if destination == "amplitude":
        per_process = run.rate / processes  # the target is a process's
        line += f" ({per_process / AMPLITUDE_TARGET:.2f}x the {AMPLITUDE_TARGET // 1000}k target a process)"
    elif destination == PLAIN:
        line = f"{PLAIN}: {run.rate:,.0f} events/s"
    print(line)
    details(run, events)


def details(run: Run, events: int) -> None:
    cpu = ", ".join(f"{name} {share:.0%}" for name, share in run.cpu.items())
    print(
        f"  {events:,} events in {run.seconds:.1f}s, {run.requests:,} requests "
        f"({events / max(run.requests, 1):.0f} events each), {run.duplicates} duplicates; CPU of one core: {cpu}",
        flush=True,
    )


def run_broker(
    broker: LoopbackBroker, destinations: list[str], args: argparse.Namespace, log_dir: Path
) -> list[dict[str, Run]]:
    """Every destination's runs on `broker`, `--runs` rounds from one backlog written before the first
    sink starts; each round's sides in fresh consumer groups (`tag`: the round, when there are several)."""
    assert broker.process is not None
    config = bench_config(broker, args.partitions)
    create_all(config)
    topics = [config.names.dest(d) for d in destinations]
    mean = write_events(config.kafka, topics, args.events, args.users, args.traffic)
    print(
        f"{args.events:,} normalised track events ({describe_traffic(args.traffic, args.users)}), "
        f"mean {mean:.0f} bytes Avro, {args.partitions} partitions, written before each sink starts",
        flush=True,
    )
    standins = StandinServer(log_dir)
    pid = broker.process.pid
    rounds: list[dict[str, Run]] = []
    try:
        for number in range(1, args.runs + 1):
            tag = f"-run{number}" if args.runs > 1 else ""
            if args.runs > 1:
                print(f"run {number}/{args.runs} on {describe(broker.kind)} (1-minute load {os.getloadavg()[0]:.1f}):")
            runs: dict[str, Run] = {}
            for destination in destinations:
                runs[destination] = run_destination(config, destination, standins, pid, args, log_dir, tag)
                report(destination, runs[destination], args.events, args.processes)
                if destination == "amplitude":
                    runs[PLAIN] = run_plain(config, broker.kind, standins, pid, args, log_dir, tag)
                    report(PLAIN, runs[PLAIN], args.events)
                    print(f"product / plain: {runs[destination].rate / runs[PLAIN].rate:.2f}", flush=True)
                if args.compare_order:
                    unordered = run_destination(
                        config, destination, standins, pid, args, log_dir, tag, per_user_order=False
                    )
                    report(f"{destination} (SINK_PER_USER_ORDER=false)", unordered, args.events)
                    print(
                        f"  per-user order costs {1 - runs[destination].rate / unordered.rate:+.0%} of the "
                        f"unordered rate ({runs[destination].rate:,.0f} vs {unordered.rate:,.0f} events/s, "
                        "same backlog, same run)"
                    )
            rounds.append(runs)
    finally:
        standins.role.terminate()
    return rounds


def median_rates(rounds: list[dict[str, Run]]) -> dict[str, float]:
    """Each side's median rate over the rounds (the ratio is then one of medians, not a median of ratios)."""
    return {side: statistics.median(runs[side].rate for runs in rounds) for side in rounds[0]}


def summary(rates: dict[str, float]) -> str:
    parts = [f"{side} {rate:,.0f} events/s" for side, rate in rates.items()]
    if "amplitude" in rates and PLAIN in rates:
        ratio = rates["amplitude"] / rates[PLAIN]
        parts[list(rates).index(PLAIN)] += f" (amplitude product / plain: {ratio:.2f})"
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument(
        "--traffic",
        choices=TRAFFIC,
        default="realistic",
        help="realistic: the normaliser bench's realistic_event (5,000 users); bench: bench_event, --users users",
    )
    parser.add_argument("--users", type=int, default=500, help="users in the bench traffic")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--destinations", default="amplitude,amberflo")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per destination before giving up")
    parser.add_argument("--runs", type=int, default=1, help="rounds of every side, one backlog; medians at the end")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the product's sink as `sink D --processes N` (N members of its group); the target is per process",
    )
    parser.add_argument(
        "--compare-order",
        action="store_true",
        help="also run each sink with SINK_PER_USER_ORDER=false, and print what the ordering costs",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each sink with py-spy while it is timed: folded stacks in DIR/sink-<destination>-<mode>.txt "
        "(the plain loop's in DIR/sink-amplitude-plain.txt)",
    )
    add_broker_option(parser)
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    destinations = [d.strip() for d in args.destinations.split(",") if d.strip()]
    unknown = sorted(set(destinations) - set(registry.names()))
    if unknown:
        parser.error(f"unknown destinations {unknown}; known: {', '.join(registry.names())}")

    if args.runs < 1:
        parser.error("--runs must be at least 1")
    results = on_each_broker(
        args.broker, "sink-bench-", lambda broker, log_dir: run_broker(broker, destinations, args, log_dir)
    )
    if args.runs > 1:
        for kind, rounds in results.items():
            print(f"median of {args.runs} runs on {describe(kind)}: {summary(median_rates(rounds))}")
    if len(results) > 1:
        print(f"side by side ({f'medians of {args.runs} runs' if args.runs > 1 else 'one run'}):")
        for kind, rounds in results.items():
            print(f"  {describe(kind)}: {summary(median_rates(rounds))}")


if __name__ == "__main__":
    main()
