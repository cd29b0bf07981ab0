"""Sink memory and recovery under a destination outage: the Amplitude stand-in answers 503 to everything.

A producer writes steady input (500 events/s of realistic normalised track events, Avro-encoded) to
`segment.dest.amplitude` for the whole run. After a warm-up the stand-in goes `down` for
`--outage-seconds`, then comes back. Meanwhile the sink process's RSS (VmRSS) is sampled every second,
and its `/metrics` tell whether it paused its partitions (backpressure) and how many items it holds.

Printed: RSS at the start of the outage, the most during it, at its end (MB) and max/start, and the
most during recovery; whether input was paused; how long after the stand-in came back the sink had
caught up with the live input (everything produced 2 s earlier arrived, by count); how long until,
with the input stopped, every event was delivered or dead-lettered (stragglers wait out their
backoff); and "delivered X/Y", checked by messageId against everything the producer had
acknowledged, with anything missing looked for on the DLQ (so a loss and a dead letter differ).

Every SINK_* setting is the default, as is AMPLITUDE_EVENTS_PER_SECOND (1000/s, the project-wide
upload rate the sink keeps under): catching up with a backlog is paced by it, as it would be in
production. `--amplitude-eps` lifts it; `--sink-env NAME=VALUE` adds to the sink's environment.
`--broker both` runs the whole scenario on the embedded broker, then on Apache Kafka, in one
invocation, and ends with one summary line per broker.

    .venv/bin/python bench/sink_outage_rss.py [--outage-seconds 120] [--rate 500] [--broker embedded|apache-kafka|both]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for brokers and sink_throughput, this script's neighbours

from brokers import add_broker_option, bench_config, broker_kinds, describe, start_broker
from sink_throughput import StandinServer, normalised_events, start_sink

from worker.avro_codec import EventCodec
from worker.config import Config
from worker.dlq.headers import header_map
from worker.kafka.broker import LoopbackBroker, free_port
from worker.kafka.clients import KafkaClients
from worker.kafka.reading import assign_all, read_until_quiet
from worker.processes import Role
from worker.topics import create_all

DESTINATION = "amplitude"
CAUGHT_UP_LAG = 2.0  # seconds: caught up once everything produced this long ago is accounted for (by count)
MB = 1024 * 1024


# -- steady input ----------------------------------------------------------------------------------


class SteadyProducer(threading.Thread):
    """Writes `rate` events/s to the dest topic in 0.1 s ticks until stopped; remembers what was acknowledged."""

    def __init__(self, kafka: KafkaClients, topic: str, rate: int, users: int, limit_seconds: float) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.topic = topic
        self.rate = rate
        self.limit_seconds = limit_seconds  # a hard bound, whatever the main thread does
        self.producer = kafka.producer()
        # Events are generated lazily, so a run of any length needs no up-front memory or time.
        self.events = normalised_events(int(rate * limit_seconds) + rate, users, seed=11)
        self.acked: list[str] = []  # messageIds, appended on this thread, only read elsewhere
        self.errors: list[str] = []
        self.history: deque[tuple[float, int]] = deque(maxlen=600)  # (time, acknowledged so far)
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        per_tick = max(1, self.rate // 10)
        tick = 0
        while not self.stopping.is_set() and time.monotonic() - started < self.limit_seconds:
            for _ in range(per_tick):
                key, value, message_id = next(self.events)
                self.producer.produce(self.topic, value, key, self._delivered(message_id))
            tick += 1
            self.producer.poll(0)
            self.history.append((time.monotonic(), len(self.acked)))
            self.stopping.wait(max(0.0, started + tick / 10 - time.monotonic()))
        self.producer.flush(60)
        self.history.append((time.monotonic(), len(self.acked)))

    def _delivered(self, message_id: str) -> Any:
        def callback(error: Any, _message: Any) -> None:
            if error is None:
                self.acked.append(message_id)
            else:
                self.errors.append(str(error))

        return callback

    def acked_before(self, moment: float) -> int:
        """How many events had been acknowledged by `moment` (from the tick history)."""
        count = 0
        for when, acked in list(self.history):
            if when > moment:
                break
            count = acked
        return count

    def stop(self) -> None:
        self.stopping.set()
        if self.ident is not None:  # started
            self.join(90)


# -- what the sink looks like from outside -------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from the sink's METRICS_PORT: metric name -> value, summed over labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: Counter[str] = Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_part, _, value = line.rpartition(" ")
            values[name_part.split("{", 1)[0]] += float(value)
    return dict(values)


@dataclass
class Sample:
    at: float  # seconds since the outage began
    rss: float
    paused: float
    outstanding: float
    dead_lettered: float
    received: int
    produced: int


@dataclass
class Watch:
    sink: Role
    metrics_port: int
    standins: StandinServer
    producer: SteadyProducer
    outage_started: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    def sample(self) -> Sample:
        if not self.sink.alive():
            raise SystemExit(f"the sink exited ({self.sink.process.returncode}); see {self.sink.log_path}")
        metrics = scrape(self.metrics_port)
        sample = Sample(
            at=time.monotonic() - self.outage_started,
            rss=rss_mb(self.sink.pid),
            paused=metrics.get("segment_worker_paused_partitions", 0.0),
            outstanding=metrics.get("segment_worker_sink_outstanding_items", 0.0),
            dead_lettered=metrics.get("segment_worker_dead_lettered_total", 0.0),
            received=self.standins.stats(DESTINATION)["received"],
            produced=len(self.producer.acked),
        )
        self.samples.append(sample)
        return sample


def show(sample: Sample) -> None:
    print(
        f"  t={sample.at:6.0f}s rss {sample.rss:6.1f} MB  paused {sample.paused:.0f}  "
        f"outstanding {sample.outstanding:7.0f}  dead-lettered {sample.dead_lettered:.0f}  "
        f"received {sample.received:7d}/{sample.produced}",
        flush=True,
    )


def every_second(watch: Watch, seconds: float, until: Any = None) -> Sample | None:
    """Sample once a second for `seconds` (or until `until(sample)` holds, then return that sample)."""
    end = time.monotonic() + seconds
    tick = time.monotonic()
    while time.monotonic() < end:
        sample = watch.sample()
        if len(watch.samples) % 10 == 0:
            show(sample)
        if until is not None and until(sample):
            return sample
        tick += 1.0
        time.sleep(max(0.0, tick - time.monotonic()))
    return None


# -- the run -----------------------------------------------------------------------------------------


def warm_up(watch: Watch, seconds: float) -> None:
    """Steady state first: the sink joined its group and is keeping up with the input."""
    deadline = time.monotonic() + 60
    while watch.standins.stats(DESTINATION)["received"] == 0:
        if not watch.producer.is_alive():
            raise SystemExit("the steady producer stopped before the sink delivered anything (traceback above)")
        if time.monotonic() > deadline or not watch.sink.alive():
            raise SystemExit(f"the sink delivered nothing within 60 s; see {watch.sink.log_path}")
        time.sleep(0.2)
    time.sleep(seconds)


def caught_up(producer: SteadyProducer) -> Any:
    """Everything produced CAUGHT_UP_LAG ago is accounted for: delivered, or dead-lettered (it never will be)."""

    def check(sample: Sample) -> bool:
        return sample.received + sample.dead_lettered >= producer.acked_before(time.monotonic() - CAUGHT_UP_LAG)

    return check


def dead_letters(config: Config, timeout: float = 30.0) -> dict[str, str]:
    """messageId -> error_kind of every message on the DLQ (read until quiet for 3 s)."""
    consumer = config.kafka.reader("bench-dlq-reader")
    codec = EventCodec()
    found: dict[str, str] = {}
    try:
        assign_all(consumer, [config.names.dlq(DESTINATION)])
        for message in read_until_quiet(consumer, 3.0, time.monotonic() + timeout, grace=0.0, batch=1000):
            event, _extra = codec.decode(message.value())
            found[event["messageId"]] = header_map(message.headers()).get("error_kind") or "?"
    finally:
        consumer.close()
    return found


@dataclass
class Outcome:
    produced: int
    delivered: int
    dead_lettered: Counter[str]  # error_kind -> how many of the undelivered events are on the DLQ
    lost: list[str]  # messageIds neither delivered nor dead-lettered
    all_in: float | None  # seconds from the destination's return until every event was delivered or dead-lettered


def settle(watch: Watch, back: float, timeout: float) -> float | None:
    """Wait (input stopped) until every acknowledged event is delivered or dead-lettered."""
    produced = len(watch.producer.acked)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sample = watch.sample()
        if sample.received + sample.dead_lettered >= produced:
            return time.monotonic() - back
        time.sleep(0.5)
    return None


def verify(watch: Watch, config: Config, back: float, timeout: float) -> Outcome:
    """Compare what arrived (by insert_id = messageId) with everything the producer had acknowledged."""
    all_in = settle(watch, back, timeout)
    produced = set(watch.producer.acked)
    received = watch.standins.call("GET", f"/_standin/{DESTINATION}/received", timeout=120)
    missing = produced - received.keys()
    on_dlq = dead_letters(config) if missing else {}
    kinds = Counter(on_dlq[m] for m in missing if m in on_dlq)
    lost = sorted(m for m in missing if m not in on_dlq)
    return Outcome(len(produced), len(produced) - len(missing), kinds, lost, all_in)


def summarise(watch: Watch, outage: float, recovery: float | None, outcome: Outcome) -> None:
    during = [s for s in watch.samples if 0 <= s.at <= outage]
    after = [s for s in watch.samples if s.at > outage]
    start, end = during[0], during[-1]
    peak = max(during, key=lambda s: s.rss)
    paused = [s for s in during if s.paused > 0]
    print(f"RSS at start of outage: {start.rss:.1f} MB")
    print(f"RSS max during outage:  {peak.rss:.1f} MB (t={peak.at:.0f}s)")
    print(f"RSS at end of outage:   {end.rss:.1f} MB")
    print(f"ratio max/start: {peak.rss / start.rss:.2f}")
    if after:
        print(f"RSS max during recovery: {max(s.rss for s in after):.1f} MB, at the end {after[-1].rss:.1f} MB")
    if paused:
        print(
            f"input paused: yes, from t={paused[0].at:.0f}s ({max(s.paused for s in paused):.0f} partitions), "
            f"holding at most {max(s.outstanding for s in during):,.0f} items"
        )
    else:
        print(f"input paused: no (at most {max(s.outstanding for s in during):,.0f} items outstanding)")
    print(f"backlog when the stand-in came back: {end.produced - end.received:,} events")
    if recovery is None:
        print("recovery: did not catch up with the live input in time")
    else:
        print(f"recovery: caught up with the live input {recovery:.0f}s after the stand-in came back")
    if outcome.all_in is not None:
        print(f"every event delivered or dead-lettered {outcome.all_in:.0f}s after the stand-in came back")
    verdict = "" if outcome.delivered == outcome.produced else " (NOT ALL)"
    print(f"delivered {outcome.delivered}/{outcome.produced}{verdict}")
    if outcome.dead_lettered:
        print("dead-lettered: " + ", ".join(f"{n} {kind}" for kind, n in sorted(outcome.dead_lettered.items())))
    if outcome.lost:
        print(f"LOST (neither delivered nor dead-lettered): {len(outcome.lost)}, e.g. {outcome.lost[:5]}")


def one_line(watch: Watch, outage: float, recovery: float | None, outcome: Outcome) -> str:
    """RSS start/max/end of the outage, max/start, max in recovery, caught up, delivered: for the side-by-side lines."""
    during = [s for s in watch.samples if 0 <= s.at <= outage]
    after = [s for s in watch.samples if s.at > outage]
    start, end = during[0], during[-1]
    peak = max(s.rss for s in during)
    paused = [s for s in during if s.paused > 0]
    parts = [
        f"RSS {start.rss:.1f} / {peak:.1f} / {end.rss:.1f} MB (max/start {peak / start.rss:.2f})",
        f"recovery max {max(s.rss for s in after):.1f} MB" if after else "no recovery samples",
        f"paused from t={paused[0].at:.0f}s" if paused else "not paused",
        f"backlog {end.produced - end.received:,}",
        "did not catch up" if recovery is None else f"caught up in {recovery:.0f}s",
        "not all in" if outcome.all_in is None else f"all in after {outcome.all_in:.0f}s",
        f"delivered {outcome.delivered}/{outcome.produced}",
    ]
    if outcome.dead_lettered:
        parts.append(f"{sum(outcome.dead_lettered.values())} dead-lettered")
    if outcome.lost:
        parts.append(f"{len(outcome.lost)} LOST")
    return ", ".join(parts)


def run(args: argparse.Namespace, broker: LoopbackBroker, log_dir: Path) -> str:
    """The scenario on `broker`; returns a one-line summary of it."""
    config = bench_config(broker, args.partitions)
    create_all(config)
    limit = args.warmup_seconds + args.outage_seconds + args.recovery_timeout + 60
    producer = SteadyProducer(config.kafka, config.names.dest(DESTINATION), args.rate, args.users, limit)
    metrics_port = free_port()
    extra = {"METRICS_PORT": str(metrics_port)}
    if args.amplitude_eps:
        extra["AMPLITUDE_EVENTS_PER_SECOND"] = str(args.amplitude_eps)
    for item in args.sink_env:
        name, _, value = item.partition("=")
        extra[name] = value
    started: list[Role] = []  # stopped by PID in the finally, whatever happened
    try:
        standins = StandinServer(log_dir)
        started.append(standins.role)
        sink = start_sink(config, DESTINATION, standins, log_dir, **extra)
        started.append(sink)
        watch = Watch(sink, metrics_port, standins, producer)
        producer.start()
        warm_up(watch, args.warmup_seconds)
        print(f"outage: the {DESTINATION} stand-in answers 503 for {args.outage_seconds:.0f}s", flush=True)
        standins.faults(DESTINATION, down=True)
        watch.outage_started = time.monotonic()
        every_second(watch, args.outage_seconds)
        standins.faults(DESTINATION)  # {} resets: the destination is back
        print("the stand-in is back", flush=True)
        back = time.monotonic()
        watch.sample()
        done = every_second(watch, args.recovery_timeout, until=caught_up(producer))
        recovery = None if done is None else done.at - (back - watch.outage_started)
        producer.stop()  # what is left is the stragglers: items still waiting out a backoff
        outcome = verify(watch, config, back, args.settle_timeout)
        summarise(watch, args.outage_seconds, recovery, outcome)
        return one_line(watch, args.outage_seconds, recovery, outcome)
    finally:
        producer.stop()
        for role in reversed(started):
            role.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outage-seconds", type=float, default=120)
    parser.add_argument("--rate", type=int, default=500, help="input events/s, for the whole run")
    parser.add_argument("--warmup-seconds", type=float, default=10)
    parser.add_argument("--recovery-timeout", type=float, default=600)
    parser.add_argument(
        "--settle-timeout", type=float, default=180, help="seconds to wait for stragglers after the input stops"
    )
    parser.add_argument(
        "--sink-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the sink"
    )
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--amplitude-eps", type=float, help="AMPLITUDE_EVENTS_PER_SECOND (default: the sink's)")
    add_broker_option(parser)
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="sink-outage-"))
    print(f"logs in {log_dir}")
    lines: dict[str, str] = {}
    for kind in broker_kinds(args.broker):
        kind_dir = log_dir / kind
        kind_dir.mkdir()
        broker = start_broker(kind, kind_dir)
        try:
            lines[kind] = run(args, broker, kind_dir)
        finally:
            broker.stop()
    if len(lines) > 1:
        print("side by side (one run):")
        for kind, line in lines.items():
            print(f"  {describe(kind)}: {line}")
    shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
