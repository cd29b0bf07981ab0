"""The whole pipeline under load and faults, on a seeded schedule (issue 13).

SDK-shaped traffic (identifies and tracks of several people, each with a per-person sequence number
in its messageId, properties and traits; anonymous-only people too) goes partly through the
collector (`segment-worker collect`, HTTP batches, one at a time as an SDK sends them) and partly
straight to `segment.raw`, keyed by person; a few fixed poison bodies are mixed in. A normaliser
group and a sink group for each of the four destinations run as real processes against the
stand-ins. Meanwhile, on a schedule drawn from CHAOS_SEED:

- normaliser and sink processes are killed with -9 and restarted;
- a group is scaled 1 -> 2 -> 3 -> 2 -> 1 (SIGTERM for the way down); the groups use eager
  (`range`) and cooperative-sticky assignment, both in every run (`assignors`);
- every destination answers 5xx (and hangs into 504) at a rate, has 429 storms, spells of
  rejecting the API key (401, or Amplitude's 400 "Invalid API key") and outages (503 to
  everything): a few seconds each in a short run, the outages a minute long in a soak;
- poison is mixed in: fixed bodies (bad JSON, no type, ...) and hostile events and bytes drawn by
  hypothesis from the normaliser's fuzz strategies (`hypothesis_poison`, seeded by CHAOS_SEED).

Membership changes happen one at a time, each only once its group has settled (every live
member's `segment_worker_assigned_partitions` > 0 and summing to the partition count): the
embedded broker wedges a group a member leaves mid-rebalance (docs/BROKERS.md), which would be a
broker defect, not the pipeline's.

At the end, what each destination should have is computed from what the normaliser wrote to its
topic, with the destination's own `map_event` (so a Skip, e.g. Brevo without a userId, is not
counted as a loss), and checked:

- every good event sent is on every destination topic (or dead-lettered by the normaliser);
- every item a destination should accept is in its stand-in exactly once by dedupe key (the
  stand-in suppresses and counts repeats), or dead-lettered with a reason; nothing else arrived;
- the poison is dead-lettered with a reason;
- each person's events arrived in sequence order at each destination (first arrivals; upserted
  contacts and customers hold the person's last identify);
- every role process is alive (those killed were restarted), and each group's committed offsets
  are at the end of its input topic (no lag), then each stops cleanly on SIGTERM.

A summary line reports the counts. CHAOS_SECONDS (default 40) and CHAOS_RATE (events/s, default
100) make `make test` short and `make soak` long; CHAOS_SEED (default 13) draws the schedule and the
traffic, and the same seed replays the same schedule (printed first, and in a failure's message).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import random
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import hypothesis
import orjson
import pytest
import requests
from confluent_kafka import Message, Producer, TopicPartition
from hypothesis import strategies as st

from tests.integration.test_collector import CollectorProcess
from tests.kafka_helpers import crash_test_variables, role_env, settings_for, setup_topics, start_role
from tests.sink_helpers import DESTINATIONS, Standins, metric_value, start_sink
from tests.unit.test_normaliser_fuzz import events as fuzz_events
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.destinations.base import Destination, Skip, Unmappable
from worker.dlq.headers import header_map
from worker.kafka.broker import LoopbackBroker, free_port
from worker.kafka.reading import assign_all, read_batches_until_quiet
from worker.names import sink_role
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.processes import Role

pytestmark = pytest.mark.integration
# The subject is the pipeline's guarantees, not the broker: the first broker chosen is enough (and a
# second leg would double the longest test of the suite).
FIRST_BROKER_ONLY = True

SECONDS = float(os.environ.get("CHAOS_SECONDS", "40"))
RATE = float(os.environ.get("CHAOS_RATE", "100"))
SEED = int(os.environ.get("CHAOS_SEED", "13"))

PARTITIONS = 4
PEOPLE = 24
WRITE_KEY = "wk_chaos"
NORMALIZE = "normalize"
GROUPS = (NORMALIZE, *DESTINATIONS)
# The stand-in record keys that are upserts (a contact, a customer, a device), not events: their
# place in arrival order is the first write's, so order is checked on their final state instead.
UPSERT_PREFIXES = ("contact:", "customer:", "device:")
STORM_SECONDS = 3.0
# "Down for a minute" in a soak; a short run cannot afford a minute, so a tenth of its length.
OUTAGE_SECONDS = min(60.0, max(3.0, SECONDS / 10))
FAULT_KINDS = ("storm", "keys", "outage")
HYPOTHESIS_POISON = 20  # drawn at each of the three poison moments
# Rates of the background faults; injected timeouts hang longer than the sinks' request timeout.
BASE_FAULTS = {"error_rate": 0.05, "timeout_rate": 0.01, "timeout_seconds": 3.0}
SINK_ENV = {"SINK_REQUEST_TIMEOUT": "2"}  # CPU contention on 2 cores must not pass for a timeout
SETTLE_TIMEOUT = 60.0
# After the traffic, the slowest sinks work off their backlog: Reteno and Brevo take one item a
# request, eight at once, and the background hangs hold a request for the 2 s timeout, so at 1,000
# events/s they fall behind all through a soak (a 30-minute one left each 1.3 million records) and
# drain at 1,000-2,500 items/s once the faults stop, while this test reads the topics back.
DRAIN_TIMEOUT = 60.0 + SECONDS / 2
CODEC = EventCodec()
PERSON = re.compile(r"(?:user|anon)-\d{3}")
FIRST_NAME = re.compile(r"v(\d{7})")
POISON_MARKER = re.compile(rb"poison-[a-z0-9]+")
MESSAGE_ID = re.compile(rb'"messageId": ?"([^"]+)"')


# -- the schedule -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    at: float  # seconds after the traffic started
    kind: str  # kill | scale-up | scale-down | storm | outage
    group: str  # "normalize" or a destination

    def __str__(self) -> str:
        return f"{self.at:6.1f}s {self.kind} {self.group}"


def schedule(seed: int, seconds: float) -> tuple[list[Action], list[Action]]:
    """(membership changes, destination faults) drawn from `seed`: the same seed and length give the
    same schedule. At least one kill of the normaliser, one of a sink and one 1 -> 3 -> 1 scaling."""
    rng = random.Random(seed)
    # A kill takes 1.5 session timeouts before its replacement joins, and each change waits for the
    # group to settle: one change per 20 s of traffic keeps a long run on schedule.
    slots = max(5, int(seconds // 20))
    kinds = ["kill-normalize", "kill-sink", "scale", "kill-sink"]
    while len(kinds) + 3 * kinds.count("scale") < slots:
        kinds.append(rng.choice(["kill-normalize", "kill-sink", "kill-sink", "scale"]))
    rng.shuffle(kinds)
    steps: list[tuple[str, str]] = []
    for kind in kinds:
        if kind == "scale":
            group = rng.choice(GROUPS)
            # One member at a time (the embedded broker's wedge), straight back down to one.
            steps += [("scale-up", group)] * 2 + [("scale-down", group)] * 2
        else:
            steps.append(("kill", NORMALIZE if kind == "kill-normalize" else rng.choice(DESTINATIONS)))
    spacing = seconds * 0.85 / len(steps)
    membership = [Action(round(spacing * (i + 0.5), 1), kind, group) for i, (kind, group) in enumerate(steps)]
    # A 429 storm and a spell of rejected keys for each destination in every two minutes, an
    # outage in every third such round (each kind once in a short run).
    rounds = max(1, int(seconds // 120))
    faults = [
        Action(round((r + rng.uniform(0.1, 0.8)) * seconds / rounds, 1), kind, destination)
        for r in range(rounds)
        for destination in DESTINATIONS
        for kind in FAULT_KINDS
        if kind != "outage" or r % 3 == 0
    ]
    return membership, sorted(faults, key=lambda a: a.at)


def assignors(seed: int) -> dict[str, str]:
    """Each group's assignment strategy: eager and cooperative-sticky alternate over the groups from
    a seeded start, so every run has both and a seed decides which group gets which."""
    kinds = ["range", "cooperative-sticky"]
    first = random.Random(seed * 101).randrange(2)
    return {group: kinds[(first + i) % 2] for i, group in enumerate(GROUPS)}


# -- the traffic --------------------------------------------------------------------------------------


def person_of(number: int) -> str:
    """Every eighth person is anonymous only (never identified): keyed by anonymousId."""
    return f"anon-{number:03d}" if number % 8 == 7 else f"user-{number:03d}"


PERSON_NAMES = [person_of(number) for number in range(PEOPLE)]  # one string each, shared by their events


def through_collector(number: int) -> bool:
    return number % 3 == 0


def event_for(seed: int, number: int, seq: int, rng: random.Random) -> dict[str, Any]:
    person = person_of(number)
    message_id = f"c{seed}-{person}-{seq:07d}"
    ids: dict[str, str] = (
        {"anonymousId": person} if person.startswith("anon") else {"userId": person, "anonymousId": f"dev-{number:03d}"}
    )
    if "userId" in ids and rng.random() < 0.2:
        return {
            "type": "identify",
            **ids,
            "messageId": message_id,
            "traits": {"email": f"{person}@example.com", "firstName": f"v{seq:07d}", "seq": seq},
        }
    return {
        "type": "track",
        **ids,
        "messageId": message_id,
        "event": "Chaos Step",
        "properties": {"seq": seq, "value": 1, "plan": "pro"},
        "context": {"ip": "81.2.69.142", "library": {"name": "analytics-python", "version": "2.3.3"}},
    }


# Fixed poison, straight to segment.raw: each body carries a marker to find its dead letter by.
POISON = [
    ("user-poison", b'{"type": "track", "userId": "user-poison", "messageId": "poison-badjson", "event": '),
    ("user-poison", b'{"userId": "user-poison", "messageId": "poison-notype", "event": "No Type"}'),
    ("user-poison", b'{"type": "track", "userId": "user-poison", "messageId": "poison-noevent", "properties": {}}'),
    ("user-poison", b'{"type": "bogus", "userId": "user-poison", "messageId": "poison-badtype"}'),
]


def hypothesis_poison(seed: int, count: int) -> list[tuple[str, bytes]]:
    """`count` hostile bodies drawn by hypothesis with `seed` (the same seed, the same bodies): events
    of every type with fields of any shape (tests/unit/test_normaliser_fuzz.py's `events`) and raw
    bytes. Each ends with its marker: an event's last `messageId` key (JSON's last duplicate wins),
    so the event is found on a destination topic if the normaliser passes it on; bytes end with it."""
    found: list[bytes] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=count * 3,
        database=None,
        phases=[hypothesis.Phase.generate],
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(st.one_of(fuzz_events(), fuzz_events(), fuzz_events(), st.binary(max_size=300)))
    def draw(body: str | bytes) -> None:
        if len(found) < count:
            marker = f"poison-h{len(found)}"
            if isinstance(body, bytes):
                found.append(body + marker.encode())
            else:
                opening = "{" if body == "{}" else body[:-1] + ","
                found.append(f'{opening}"messageId":"{marker}"}}'.encode("utf-8", "surrogatepass"))

    draw()
    assert len(found) == count, f"hypothesis drew {len(found)} poison bodies, not {count}"
    return [("user-poison", body) for body in found]


def marker_of(body: bytes) -> str | None:
    """A poison body's marker: the last one in it (a hostile field may hold marker-like text too)."""
    found = POISON_MARKER.findall(body)
    return found[-1].decode() if found else None


def filtered_by_the_normaliser(body: bytes) -> bool:
    """Whether the normaliser's own pure pipeline routes `body` nowhere without rejecting it (an
    event whose `integrations` turn every destination off): then it is neither dead-lettered nor on
    any topic, rightly."""
    result = Normaliser(list(DESTINATIONS), IdentityMap(100), []).process(body, int(time.time() * 1000), "raw", 0, 0)
    return bool(result.filtered) and not result.routed and not result.rejected


class Origin(NamedTuple):
    """What the check needs of a sent event (a soak sends millions: not the events themselves)."""

    person: str  # its userId, else its anonymousId
    seq: int  # its place in the person's sequence
    identify: bool


@dataclass
class Traffic:
    """What was sent: every good event by messageId, in each person's sequence."""

    events: dict[str, Origin] = field(default_factory=dict)
    via_collector: int = 0
    via_raw: int = 0
    collector_retries: int = 0
    errors: list[str] = field(default_factory=list)


def run_traffic(
    settings: Config, collector_url: str, traffic: Traffic, poison: list[tuple[str, bytes]], stop: threading.Event
) -> None:
    """CHAOS_RATE events a second for CHAOS_SECONDS, in 0.1 s ticks; the fixed poison at a quarter,
    half and three quarters of the way, each time with a third of `poison` (hypothesis's).
    Collector people's events go through a sender thread that posts one batch at a time and resends
    a refused one (as an SDK does; duplicates are deduplicated)."""
    rng = random.Random(SEED * 7919)
    sequences = Counter[int]()
    outbox: queue.Queue[list[dict[str, Any]] | None] = queue.Queue()
    sender = threading.Thread(target=send_batches, args=(collector_url, outbox, traffic, stop), daemon=True)
    sender.start()
    producer = Producer(settings.kafka.producer_config())
    raw = settings.names.raw
    started = time.monotonic()
    ticks = int(SECONDS * 10)
    poison_at = sorted({ticks // 4, ticks // 2, 3 * ticks // 4})
    drawn = {tick: poison[i :: len(poison_at)] for i, tick in enumerate(poison_at)}
    owed = 0.0
    try:
        for tick in range(ticks):
            if stop.is_set():
                break
            owed += RATE / 10
            batch: list[dict[str, Any]] = []
            for _ in range(int(owed)):
                number = rng.randrange(PEOPLE)
                sequences[number] += 1
                event = event_for(SEED, number, sequences[number], rng)
                traffic.events[event["messageId"]] = Origin(
                    PERSON_NAMES[number], sequences[number], event["type"] == "identify"
                )
                if through_collector(number):
                    batch.append(event)
                else:
                    producer.produce(raw, orjson.dumps(event), person_of(number))
                    traffic.via_raw += 1
            owed -= int(owed)
            if tick in drawn:
                for key, body in POISON + drawn[tick]:
                    producer.produce(raw, body, key)
            if batch:
                outbox.put(batch)
            producer.poll(0)
            time.sleep(max(0.0, started + (tick + 1) / 10 - time.monotonic()))
        if producer.flush(60):
            traffic.errors.append("the raw producer did not flush in 60 s")
    finally:
        outbox.put(None)
        sender.join(120)


def send_batches(
    url: str, outbox: queue.Queue[list[dict[str, Any]] | None], traffic: Traffic, stop: threading.Event
) -> None:
    with requests.Session() as session:
        while (batch := outbox.get()) is not None:
            for attempt in range(20):
                try:
                    status = session.post(f"{url}/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, ""), timeout=30)
                    if status.status_code == 200:
                        traffic.via_collector += len(batch)
                        break
                except requests.RequestException:
                    pass
                traffic.collector_retries += 1
                time.sleep(min(2.0, 0.1 * 2**attempt))
            else:
                traffic.errors.append(f"the collector refused a batch 20 times ({len(batch)} events)")
            if stop.is_set():
                return


# -- the roles ----------------------------------------------------------------------------------------


@dataclass
class Member:
    role: Role
    port: int


def peak_rss_mib(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), in MiB; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


class Group:
    """The processes of one role (the normaliser, or one destination's sink), each with /metrics."""

    def __init__(self, name: str, start: Any) -> None:
        self.name = name
        self._start = start  # (metrics port) -> Role
        self.members: list[Member] = []
        self.killed = 0
        self.peak_rss = 0.0  # MiB, the most any of its processes held (read before each one stops)

    def _note_rss(self, member: Member) -> None:
        self.peak_rss = max(self.peak_rss, peak_rss_mib(member.role.pid))

    def add(self) -> None:
        port = free_port()
        self.members.append(Member(self._start(port), port))

    def assigned(self) -> list[float | None]:
        return [metric_value(m.port, "segment_worker_assigned_partitions") for m in self.members]

    def settled(self) -> bool:
        counts = self.assigned()
        return all(c is not None and c > 0 for c in counts) and sum(c or 0 for c in counts) == PARTITIONS

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until every member holds partitions and together all of them, twice 0.5 s apart."""
        deadline = time.monotonic() + timeout
        stable = 0
        while stable < 2:
            dead = [m.role.log_path for m in self.members if not m.role.alive()]
            if dead:
                raise AssertionError(f"{self.name}: a member exited: {dead}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not settle in {timeout}s (wedged?): assigned {self.assigned()}")
            stable = stable + 1 if self.settled() else 0
            time.sleep(0.5)

    def kill_and_restart(self, rng: random.Random, session_timeout: float) -> None:
        victim = self.members.pop(rng.randrange(len(self.members)))
        self._note_rss(victim)
        victim.role.kill()
        self.killed += 1
        # The dead member leaves the group when its session times out; the replacement joins after
        # that, so no member leaves while the group rebalances (the embedded broker's wedge).
        time.sleep(session_timeout * 1.5 + 0.5)
        self.add()

    def scale_down(self) -> None:
        newest = self.members.pop()
        self._note_rss(newest)
        code = newest.role.terminate()
        assert code == 0, f"{self.name}: a member stopped with {code}: {newest.role.log_path}"

    def all_alive(self) -> bool:
        return bool(self.members) and all(m.role.alive() for m in self.members)

    def terminate(self) -> list[int]:
        for member in self.members:
            self._note_rss(member)
        codes = [m.role.terminate() for m in self.members]
        self.members.clear()
        return codes


# -- reading back -------------------------------------------------------------------------------------


# Reading a soak's topics back takes minutes (1.8 million records each at 1,000 events/s for 30 min).
READ_TIMEOUT = max(300.0, SECONDS / 2)
# Fetch more a request than librdkafka's 1 MB a partition: the embedded broker answers a fetch only
# when its wait runs out, so what one fetch brings sets how fast a soak's topics are read back.
READER_FETCH = {"max.partition.fetch.bytes": str(16 << 20), "fetch.max.bytes": str(64 << 20)}


def scan(
    settings: Config,
    topic: str,
    each: Callable[[Message], object],
    idle: float = 2.0,
    timeout: float = READ_TIMEOUT,
    floor: dict[int, int] | None = None,
) -> dict[int, int]:
    """Call `each` for every message of a topic, keeping none (a soak's topics hold gigabytes),
    until none has arrived for `idle` seconds and every partition is read up to its `floor` (or
    `timeout` has passed: then the lag check reports the partitions not read to their end).
    Returns each partition's end offset, as read: the embedded broker's high watermark can be wrong
    after a multi-message batch (docs/ARCHITECTURE.md); offsets read cannot.

    `floor`: offsets known to exist (a group committed past them). A busy embedded broker can
    answer a partition's fetches with nothing for longer than `idle` (gap 11 in ARCHITECTURE.md:
    a soak's last check reads while two sinks still drain their backlog), and quiet alone would
    then end the read early, so the events after that point would look lost when they were not."""
    found = dict.fromkeys(range(PARTITIONS), 0)
    wanted = floor or {}
    consumer = settings.kafka.reader("chaos-reader", READER_FETCH)

    def read_to_floor() -> bool:
        return all(found[p] >= offset for p, offset in wanted.items())

    try:
        assign_all(consumer, [settings.names.full_topic(topic)])
        started = time.monotonic()
        deadline = started + timeout
        batches = read_batches_until_quiet(consumer, idle, deadline, caught_up=read_to_floor, batch=5000)
        first: float | None = None
        for messages in batches:
            first = first or time.monotonic()
            for message in messages:
                each(message)
                found[message.partition()] = max(found[message.partition()], message.offset() + 1)
        if SECONDS > 60:  # a soak (run with -s) shows how each read went; `make test` stays quiet
            took = time.monotonic() - started
            to_first = "nothing read" if first is None else f"first batch after {first - started:.1f}s"
            print(f"read {topic}: offsets summing to {sum(found.values())} in {took:.1f}s ({to_first}), ends {found}")
        return found
    finally:
        consumer.close()


def read_all(settings: Config, topic: str) -> list[Message]:
    """Every message of a small topic (a dead-letter topic)."""
    messages: list[Message] = []
    scan(settings, topic, messages.append, idle=1.0)
    return messages


def committed(settings: Config, role: str, topic: str) -> dict[int, int]:
    """The group's committed offsets, read without joining it (committed() only)."""
    consumer = settings.kafka.consumer(role)
    try:
        full = settings.names.full_topic(topic)
        found = consumer.committed([TopicPartition(full, p) for p in range(PARTITIONS)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in found}
    finally:
        consumer.close()


def wait_caught_up(settings: Config, role: str, topic: str, end: dict[int, int], timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    lag = {p: end[p] - c for p, c in committed(settings, role, topic).items()}
    while any(lag.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
        lag = {p: end[p] - c for p, c in committed(settings, role, topic).items()}
    return lag


def lag_once_read(settings: Config, role: str, topic: str, each: Callable[[Message], object]) -> dict[int, int]:
    """`each` for every record of `topic`, read at least as far as `role`'s group has committed
    (records that certainly exist: quiet alone can end a read early, `scan`), then the group's lag
    against what was read, once it has caught up or DRAIN_TIMEOUT has passed."""
    floor = committed(settings, role, topic)
    return wait_caught_up(settings, role, topic, scan(settings, topic, each, floor=floor), DRAIN_TIMEOUT)


def wait_quiet(standins: Standins, destination: str, quiet: float = 2.0, timeout: float = 60.0) -> None:
    """Until the stand-in's count, duplicates and requests have not changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    stats = standins.stats(destination)
    since = time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.3)
        now = standins.stats(destination)
        if (now["received"], now["duplicates"], now["requests"]) != (
            stats["received"],
            stats["duplicates"],
            stats["requests"],
        ):
            stats, since = now, time.monotonic()


def inversions(sequence: list[int]) -> int:
    return sum(1 for before, after in itertools.pairwise(sequence) if after < before)


# -- the test -----------------------------------------------------------------------------------------


# The embedded broker answers a fetch with nothing when reading the partition takes longer than the
# fetch's wait, and that reading grows with the partition's record batches (docs/ARCHITECTURE.md,
# gap 11): at the 10 ms wait its clients use elsewhere, a partition is never served again once it holds
# some 20,000 batches, which a soak reaches within minutes. This test does not measure latency, so its
# clients keep librdkafka's default wait, as users' clients do.
LONG_RUN_FETCH_WAIT = {"KAFKA_FETCH_WAIT_MAX_MS": "500"}


@pytest.fixture
def settings(broker: LoopbackBroker, prefix: str) -> Config:
    variables = {**crash_test_variables(broker), **LONG_RUN_FETCH_WAIT}
    settings = settings_for(broker, prefix, partitions=PARTITIONS, **variables)
    setup_topics(settings)
    return settings


@pytest.fixture
def groups(settings: Config, clean_standins: Standins, tmp_path: Path) -> Iterator[dict[str, Group]]:
    assignor = assignors(SEED)

    def normaliser(port: int) -> Role:
        return start_role(
            settings,
            [NORMALIZE],
            tmp_path,
            METRICS_PORT=str(port),
            KAFKA_PARTITION_ASSIGNMENT_STRATEGY=assignor[NORMALIZE],
        )

    def sink_of(destination: str) -> Any:
        return lambda port: start_sink(
            settings,
            destination,
            clean_standins,
            tmp_path,
            METRICS_PORT=str(port),
            KAFKA_PARTITION_ASSIGNMENT_STRATEGY=assignor[destination],
            **SINK_ENV,
        )

    running = {NORMALIZE: Group(NORMALIZE, normaliser)} | {d: Group(d, sink_of(d)) for d in DESTINATIONS}
    try:
        for group in running.values():
            group.add()
        for group in running.values():
            group.wait_settled()
        yield running
    finally:
        for group in running.values():
            group.terminate()


# The suite's default timeout is for short tests: this one takes the traffic's length, plus start-up,
# settling and the drain.
@pytest.mark.timeout(int(SECONDS * 2.5 + 600))
def test_the_pipeline_keeps_its_promises_through_kills_scaling_storms_and_outages(
    settings: Config, clean_standins: Standins, groups: dict[str, Group], tmp_path: Path
) -> None:
    standins = clean_standins
    membership, destination_faults = schedule(SEED, SECONDS)
    plan = "\n".join(map(str, sorted(membership + destination_faults, key=lambda a: a.at)))
    print(f"\nchaos: seed {SEED}, {SECONDS:g} s at {RATE:g} events/s, schedule:\n{plan}")
    session_timeout = int(settings.sources.get("KAFKA_SESSION_TIMEOUT_MS", "6000")) / 1000
    rng = random.Random(SEED * 31)
    seeds = {d: rng.randrange(1 << 30) for d in DESTINATIONS}
    for destination in DESTINATIONS:
        standins.faults(destination, **BASE_FAULTS, seed=seeds[destination])

    # Drawn before the clock starts: the faults' schedule and the traffic share `started`.
    poison = hypothesis_poison(SEED, 3 * HYPOTHESIS_POISON)
    collector = CollectorProcess(role_env(settings, COLLECTOR_WRITE_KEYS=WRITE_KEY), tmp_path / "collect.log")
    traffic = Traffic()
    stop = threading.Event()
    done: list[str] = []
    changed = 0
    started = time.monotonic()
    sender = threading.Thread(target=run_traffic, args=(settings, collector.url, traffic, poison, stop), daemon=True)
    faulter = threading.Thread(
        target=inject_faults, args=(standins, destination_faults, seeds, started, stop, done), daemon=True
    )
    problems: list[str] = []
    summary: dict[str, Any] = {"faults": {}}
    try:
        sender.start()
        faulter.start()
        try:
            for action in membership:
                time.sleep(max(0.0, started + action.at - time.monotonic()))
                group = groups[action.group]
                if action.kind == "kill":
                    group.kill_and_restart(rng, session_timeout)
                elif action.kind == "scale-up":
                    group.add()
                else:
                    group.scale_down()
                group.wait_settled()
                done.append(f"{time.monotonic() - started:6.1f}s {action.kind} {action.group} (settled)")
                changed += 1
        except AssertionError as failure:
            problems.append(f"membership schedule broke off: {failure}")
        sender.join(SECONDS + 180)
        stop.set()
        faulter.join(30)
        for destination in DESTINATIONS:  # the end of the chaos: the destinations are healthy again
            standins.faults(destination, seed=seeds[destination])
        problems += [f"traffic: {error}" for error in traffic.errors]
        if sender.is_alive():
            problems.append("the traffic did not finish")
        summary, found = check(settings, standins, groups, traffic, poison, collector)
        problems += found
    finally:
        stop.set()
        collector_code = collector.terminate()
    if collector_code != 0:
        problems.append(f"the collector stopped with {collector_code}")
    for name, group in groups.items():
        codes = group.terminate()
        if codes != [0] * len(codes):
            problems.append(f"{name} stopped with {codes} on SIGTERM")
    summary["peak RSS MiB"] = {name: round(group.peak_rss, 1) for name, group in groups.items()}
    summary["faults"]["scheduled"] = dict(Counter(f"{a.kind} {a.group}" for a in membership + destination_faults))
    summary["faults"]["membership changes done"] = changed
    summary["faults"]["fault changes done"] = len(done) - changed
    line = "chaos summary: " + json.dumps({"seed": SEED, "seconds": SECONDS, "rate": RATE, **summary}, sort_keys=False)
    print(line)
    assert not problems, (
        f"seed {SEED} (replay: CHAOS_SEED={SEED} CHAOS_SECONDS={SECONDS:g} CHAOS_RATE={RATE:g}):\n"
        + "\n".join(problems[:40])
        + f"\n{line}\nschedule:\n{plan}\ndone:\n"
        + "\n".join(done)
    )


def inject_faults(
    standins: Standins,
    actions: list[Action],
    seeds: dict[str, int],
    started: float,
    stop: threading.Event,
    done: list[str],
) -> None:
    """Each storm, key-rejection spell and outage at its time, for its length, over the background faults. A
    destination's faults are set whole, so what is on is recomputed from the windows open now."""
    windows = [
        (started + a.at, started + a.at + (OUTAGE_SECONDS if a.kind == "outage" else STORM_SECONDS), a) for a in actions
    ]
    changes = sorted({t for start, end, _a in windows for t in (start, end)})
    for moment in changes:
        if stop.wait(max(0.0, moment - time.monotonic())):
            return
        now = time.monotonic()
        for destination in DESTINATIONS:
            open_now = [a.kind for start, end, a in windows if a.group == destination and start <= now < end]
            faults: dict[str, Any] = {**BASE_FAULTS, "seed": seeds[destination]}
            if "outage" in open_now:
                faults["down"] = True
            if "storm" in open_now:
                faults |= {"status_storm": 429, "retry_after": 0.5}
            if "keys" in open_now:
                faults["reject_key"] = True
            standins.faults(destination, **faults)
        done.append(
            f"{now - started:6.1f}s faults now: "
            + ", ".join(f"{a.kind} {a.group}" for s, e, a in windows if s <= now < e)
        )


def check(
    settings: Config,
    standins: Standins,
    groups: dict[str, Group],
    traffic: Traffic,
    poison: list[tuple[str, bytes]],
    collector: CollectorProcess,
) -> tuple[dict[str, Any], list[str]]:
    """Every promise, checked once the pipeline has drained; returns (summary, problems)."""
    problems: list[str] = []
    for name, group in groups.items():
        if not group.all_alive():
            problems.append(f"{name}: a process is not alive: {[m.role.log_path for m in group.members]}")
    if not collector.role.alive():
        problems.append("the collector is not alive")

    # The normaliser's group at the end of segment.raw, then each sink's at the end of its topic.
    # Each read goes at least as far as the group committed: right after a soak, while the sinks
    # still drain, a first fetch of segment.raw from its start (gigabytes, off disk) can take longer
    # than the read's quiet time, and a read that ended with nothing made the lag look negative
    # (the 2026-12-03 Apache Kafka soak).
    lag = {NORMALIZE: lag_once_read(settings, NORMALIZE, "raw", bool)}
    dead_raw = read_all(settings, "dlq.raw")
    dead_raw_ids = {m.group(1).decode() for message in dead_raw if (m := MESSAGE_ID.search(message.value() or b""))}
    last_identify: dict[str, int] = {}
    for origin in traffic.events.values():
        if origin.identify:
            last_identify[origin.person] = max(last_identify.get(origin.person, 0), origin.seq)
    summary: dict[str, Any] = {"destinations": {}}
    statuses: Counter[str] = Counter()
    passed_on: set[str] = set()  # messageIds on a dest topic that were not sent as good events: poison
    missing: set[str] = set()  # sent events absent from some dest topic
    for destination in DESTINATIONS:
        topic = DestTopic(settings.destination(destination, require_key=False), traffic)  # pure mapping: no key
        lag[destination] = lag_once_read(settings, sink_role(destination), f"dest.{destination}", topic.add)
        passed_on |= topic.unsent
        problems += check_destination(
            settings, standins, destination, topic, traffic, dead_raw_ids, last_identify, summary, statuses, missing
        )
        del topic  # a soak's topic summary is hundreds of megabytes: one destination at a time
    # No topic here is compacted or written in transactions: any offset a role's consumer skipped
    # (worker.kafka.offsets) is a loss, and names where it happened.
    gaps, filled = offset_warnings(collector.log_path.parent)
    if gaps:
        problems.append(f"{len(gaps)} offset gaps in what the roles consumed: {gaps[:10]}")
    if missing:
        # Once for all destinations: it reads every topic again (minutes in a soak).
        first = sorted(missing)[:30]  # enough to show a whole skipped range
        problems.append(f"where the first missing events are: {where_found(settings, first)}")
    for name, behind in lag.items():
        if any(behind.values()):
            problems.append(f"{name}: lag {behind} after {DRAIN_TIMEOUT:g}s")

    # The poison: dead-lettered by the normaliser with a reason, or passed on (then a destination
    # dead-letters or skips it above, by its own mapping).
    raw_reasons: dict[str, str] = {}
    for message in dead_raw:
        if marker := marker_of(message.value() or b""):
            raw_reasons[marker] = header_map(message.headers()).get("error", "")
    if reasonless := [m.offset() for m in dead_raw if not header_map(m.headers()).get("error")]:
        problems.append(f"normaliser dead letters without a reason at offsets {reasonless[:5]}")
    filtered = 0
    reasonless_poison: list[str] = []
    unaccounted: list[str] = []
    for _key, body in [*POISON, *poison]:
        name = marker_of(body)
        if name in raw_reasons:
            if not raw_reasons[name]:
                reasonless_poison.append(str(name))
        elif name not in passed_on:
            if filtered_by_the_normaliser(body):
                filtered += 1
            else:
                unaccounted.append(f"{name}: {body[:120]!r}")
    # One line each, so a failure's message keeps room for the other problems.
    if reasonless_poison:
        problems.append(
            f"{len(reasonless_poison)} poison bodies dead-lettered without a reason: {reasonless_poison[:5]}"
        )
    if unaccounted:
        problems.append(f"{len(unaccounted)} poison bodies neither dead-lettered nor passed on, e.g. {unaccounted[:2]}")
    summary = {
        "sent": len(traffic.events),
        "via collector": traffic.via_collector,
        "via raw": traffic.via_raw,
        "collector resends": traffic.collector_retries,
        "poison sent": len(POISON) * 3 + len(poison),
        "poison filtered by integrations": filtered,
        "dead-lettered raw": len(dead_raw),
        "offset gaps filled by a re-read": filled[:10] if filled else 0,
        **summary,
        "lag": {name: sum(behind.values()) for name, behind in lag.items()},
        "killed": {name: group.killed for name, group in groups.items() if group.killed},
    }
    summary["faults"] = {"responses": dict(statuses)}
    return summary, problems


class DestTopic:
    """What a dest topic holds, summed up while it is read (`add`, each record once): its events
    mapped by the destination's own `map_event` into the items the stand-in should hold."""

    def __init__(self, mapping: Destination, traffic: Traffic) -> None:
        self.mapping = mapping
        self.traffic = traffic
        self.records = 0
        self.seen: set[str] = set()  # messageIds: a normaliser redoing after a kill -9 writes some again
        self.unsent: set[str] = set()  # messageIds of events not sent as good ones (poison passed on)
        self.wrong_key: list[str] = []
        self.expected: dict[str, tuple[str, int]] = {}  # dedupe key -> (person, seq)
        self.unmappable: set[str] = set()
        self.skipped = 0

    def add(self, message: Message) -> None:
        self.records += 1
        event = CODEC.decode(message.value())[0]
        message_id = event["messageId"]
        person = event.get("userId") or event.get("anonymousId") or ""
        if (message.key() or b"").decode() != person:
            self.wrong_key.append(message_id)
        if message_id in self.seen:
            return
        self.seen.add(message_id)
        origin = self.traffic.events.get(message_id)
        if origin is None:
            self.unsent.add(message_id)
        try:
            items = self.mapping.map_event(event)
        except Skip:
            self.skipped += 1
            return
        except Unmappable:
            self.unmappable.add(message_id)
            return
        for item in items:
            if not item.dedupe_id.startswith(UPSERT_PREFIXES) and keyed_by_dedupe_id(self.mapping.name, item.endpoint):
                # Poison passed on is nobody's sequence (-1).
                self.expected[item.dedupe_id] = (origin.person, origin.seq) if origin else (person, -1)


def check_destination(
    settings: Config,
    standins: Standins,
    destination: str,
    topic: DestTopic,
    traffic: Traffic,
    dead_raw_ids: set[str],
    last_identify: dict[str, int],
    summary: dict[str, Any],
    statuses: Counter[str],
    missing: set[str],
) -> list[str]:
    """One destination's promises: everything sent reached its topic, and the stand-in holds each
    expected item once (or it was dead-lettered with a reason), in each person's order. Sent events
    missing from its topic are added to `missing`."""
    problems: list[str] = []
    if missing_on_topic := set(traffic.events) - topic.seen - dead_raw_ids:
        problems.append(
            f"{destination}: {len(missing_on_topic)} sent events never reached its topic: {sorted(missing_on_topic)[:5]}"
        )
        missing |= missing_on_topic
    if topic.wrong_key:
        problems.append(f"{destination}: {len(topic.wrong_key)} events keyed by someone else: {topic.wrong_key[:5]}")
    expected = topic.expected
    wait_quiet(standins, destination)
    events_received = [key for key in standins.received_keys(destination) if not key.startswith(UPSERT_PREFIXES)]
    upserts = standins.received(destination, UPSERT_PREFIXES)
    stats = standins.stats(destination)
    statuses.update({f"{destination} {code}": n for code, n in stats["statuses"].items() if code != "200"})
    dead = {
        CODEC.decode(m.value())[0]["messageId"]: header_map(m.headers())
        for m in read_all(settings, f"dlq.{destination}")
    }
    if unexpected := set(events_received) - set(expected):
        problems.append(f"{destination}: {len(unexpected)} arrived that nothing asked for: {sorted(unexpected)[:5]}")
    if lost := set(expected) - set(events_received) - set(dead):
        problems.append(f"{destination}: {len(lost)} LOST (neither delivered nor dead-lettered): {sorted(lost)[:5]}")
    if undead := topic.unmappable - set(dead):
        problems.append(f"{destination}: {len(undead)} unmappable events not dead-lettered: {sorted(undead)[:5]}")
    if reasonless := [key for key, headers in dead.items() if not headers.get("error")]:
        problems.append(f"{destination}: dead letters without a reason: {reasonless[:5]}")
    good_dead = sorted(set(dead) & set(traffic.events))
    # Order: each person's sequence numbers in the order their events first arrived.
    arrived: dict[str, list[int]] = defaultdict(list)
    for key in events_received:
        if key in expected and expected[key][1] >= 0:
            arrived[expected[key][0]].append(expected[key][1])
    inverted = {who: inversions(seqs) for who, seqs in arrived.items() if inversions(seqs)}
    if inverted:
        problems.append(f"{destination}: people with events out of order: {inverted}")
    # Upserts keep the last write: a contact or customer with a firstName holds the last identify.
    stale = {}
    for key, item in upserts.items():
        text = json.dumps(item)
        who, version = PERSON.search(text), FIRST_NAME.search(text)
        if who and version and int(version.group(1)) != last_identify.get(who.group(0)):
            stale[key] = (int(version.group(1)), last_identify.get(who.group(0)))
    if stale:
        problems.append(f"{destination}: upserts not holding the person's last identify (held, last): {stale}")
    summary["destinations"][destination] = {
        "expected": len(expected),
        "delivered": len(set(events_received) & set(expected)),
        "upserts": len(upserts),
        "skipped": topic.skipped,
        "dead-lettered": len(dead),
        "good dead-lettered": len(good_dead),
        # The stand-in's count: a repeat of an event key, or an upsert identical to what it holds
        # (Reteno's device record is the same on each identify, so it counts one per identify).
        "duplicates suppressed": stats["duplicates"],
        # Records the normaliser wrote again after a kill -9 (redone from its last commit).
        "redone on topic": topic.records - len(topic.seen),
        "inversions": sum(inverted.values()),
        "stale upserts": len(stale),
        "requests": stats["requests"],
    }
    if good_dead:
        problems.append(
            f"{destination}: {len(good_dead)} good events dead-lettered under transient faults, e.g. "
            f"{good_dead[0]}: {dead[good_dead[0]]}"
        )
    return problems


def where_found(settings: Config, message_ids: list[str]) -> dict[str, Any]:
    """For a failure's message: each event's (partition, offset) on segment.raw and on each dest topic
    that has it, to tell a write that never happened from one the broker did not serve back. (Reads
    the topics again: only a failed run asks.)"""
    found: dict[str, dict[str, list[tuple[int, int]]]] = {m: defaultdict(list) for m in message_ids}

    def on_raw(message: Message) -> None:
        if (m := MESSAGE_ID.search(message.value() or b"")) and (mid := m.group(1).decode()) in found:
            found[mid]["raw"].append((message.partition(), message.offset()))

    scan(settings, "raw", on_raw)
    for destination in DESTINATIONS:

        def on_dest(message: Message, destination: str = destination) -> None:
            try:
                mid = CODEC.decode(message.value())[0]["messageId"]
            except Exception:  # the poison passed on is not ours to read here
                return
            if mid in found:
                found[mid][destination].append((message.partition(), message.offset()))

        scan(settings, f"dest.{destination}", on_dest)
    return {mid: dict(places) for mid, places in found.items()}


def offset_warnings(log_dir: Path) -> tuple[list[str], list[str]]:
    """The consumer loop's warnings about a partition's offsets in every role's log, killed members'
    too, each log read once: gaps kept ("offsets skipped") and gaps a re-read filled ("gap filled
    when read again")."""
    kept: list[str] = []
    filled: list[str] = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            found = kept if '"offsets skipped' in line else filled if '"gap filled when read again' in line else None
            if found is not None:
                entry = orjson.loads(line)
                found.append(
                    f"{path.stem} {entry['timestamp']} {entry['topic']}[{entry['partition']}] "
                    f"{entry['first']}-{entry['last']}"
                )
    return kept, filled


def keyed_by_dedupe_id(destination: str, endpoint: str) -> bool:
    """The endpoints whose stand-in records items by the item's dedupe id (its events)."""
    return endpoint in {"amplitude": {"events"}, "amberflo": {"ingest"}}.get(destination, {"events"})
