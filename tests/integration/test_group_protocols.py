"""Consumer-group protocols: eager (`range`), `cooperative-sticky`, and KIP-848 (`group.protocol=consumer`).

1. A member refusing work (Backpressure, its carry of refused batches non-empty, its partitions
   paused) goes through a rebalance, the outage ends, and the partitions it kept make progress. The
   loop runs in process with a strategy that refuses while a flag is set. To make the carry empty
   on the revoke whichever assignor runs, the first member subscribes to two topics and the second
   to one of them only (a group's members may subscribe to different topics): the second member can
   be given only the `moved` topic's partition, and only that partition holds data while the first
   member is refusing, so the revoke takes everything it was refusing and leaves it the `kept`
   topic's (paused) partitions.
2. KIP-848 on Apache Kafka: the normaliser and the amplitude sink, as real processes and
   `group.protocol=consumer` groups, under load: a second member joins each group, then the first
   leaves (SIGTERM); nothing is lost and the logs show incremental assignments and revokes.
3. Under KIP-848 the classic protocol's client-side settings are refused at start-up.

The `broker` fixture runs each test on the embedded Tansu and on Apache Kafka. Tansu wedges a group
that a member leaves mid-rebalance, so membership changes one member at a time, only once the
group is stable. Where a variant cannot run on a broker, `only_where_supported` says why (reported
as a skip with that reason).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer

from tests.kafka_helpers import read, settings_for, setup_topics, start_role
from tests.sink_helpers import start_sink
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.config_loader import ConfigError
from worker.kafka.admin import TopicSpec, create_topics
from worker.kafka.clients import KafkaClients
from worker.kafka.consumer_loop import Backpressure, ConsumerLoop
from worker.kafka.offsets import Batch, TopicPartitionKey
from worker.processes import Role
from worker.standins.server import standin_env

pytestmark = pytest.mark.integration

# The group protocols under test, as the librdkafka properties a user sets through KAFKA_*.
PROTOCOLS: dict[str, dict[str, str]] = {
    "range": {"partition.assignment.strategy": "range"},  # eager: every rebalance revokes everything
    "cooperative-sticky": {"partition.assignment.strategy": "cooperative-sticky"},  # incremental, classic protocol
    "consumer": {"group.protocol": "consumer"},  # KIP-848: incremental, the broker assigns
}

# (broker kind, protocol) -> why that variant does not run there.
NOT_SUPPORTED = {
    ("embedded", "consumer"): "the embedded broker (Tansu 0.6.0) does not implement KIP-848 group.protocol=consumer "
    "(docs/ARCHITECTURE.md, the embedded broker's gap 5); the Apache Kafka leg runs it",
}


def only_where_supported(broker: Any, protocol: str) -> None:
    reason = NOT_SUPPORTED.get((broker.kind, protocol))
    if reason:
        pytest.skip(reason)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


# -- 1. backpressure through a rebalance, the loop in process -------------------------------------------

Coordinate = tuple[str, int, int]  # (topic, partition, offset)


class OutageStrategy:
    """Refuses every batch while `outage` is set (a sink whose destination is down); otherwise takes
    the batch and finishes it at once."""

    def __init__(self, outage: threading.Event) -> None:
        self.outage = outage
        self.lock = threading.Lock()
        self.refusals = 0
        self.done: set[Coordinate] = set()
        self.revoked: list[set[TopicPartitionKey]] = []

    def submit(self, batch: Batch) -> None:
        if self.outage.is_set():
            with self.lock:
                self.refusals += 1
            raise Backpressure
        with self.lock:
            self.done.update((m.topic(), m.partition(), m.offset()) for m in batch.messages)
        batch.done()

    def poll(self) -> None:
        pass

    def drain(self, timeout: float) -> None:
        pass

    def revoke(self, partitions: list[TopicPartitionKey]) -> None:
        with self.lock:
            self.revoked.append(set(partitions))

    def close(self) -> None:
        pass

    def finished(self) -> set[Coordinate]:
        with self.lock:
            return set(self.done)


class Member:
    """A ConsumerLoop's `run()` on a thread of its own."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="consumer-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:
            self.error = exc

    def assigned(self) -> frozenset[TopicPartitionKey]:
        return frozenset(self.loop.assignment)

    def stop(self, timeout: float = 30.0) -> None:
        self.loop.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return after stop()"
        if self.error is not None:
            raise AssertionError("run() failed") from self.error


@contextmanager
def member(loop: ConsumerLoop) -> Iterator[Member]:
    handle = Member(loop)
    try:
        yield handle
    finally:
        if handle.thread.is_alive():
            handle.stop()


def loop_overrides(broker: Any, protocol: str) -> dict[str, str]:
    overrides = {**PROTOCOLS[protocol], "auto.commit.interval.ms": "200"}
    if broker.kind == "embedded":
        # Tansu answers a fetch only when fetch.wait.max.ms runs out (docs/ARCHITECTURE.md gap 7).
        overrides["fetch.wait.max.ms"] = "10"
    return overrides


def produce_to(config: Config, topic: str, per_partition: dict[int, int], start: int = 0) -> None:
    producer = config.kafka.producer()
    failures: list[str] = []
    for partition, count in per_partition.items():
        for i in range(start, start + count):
            producer.produce(
                topic,
                f"{partition}-{i}".encode(),
                None,
                lambda e, _m: failures.append(str(e)) if e else None,
                partition=partition,
            )
    assert producer.flush(15) == 0 and not failures, failures


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_a_backpressured_member_resumes_the_partitions_it_kept_through_a_rebalance(broker, prefix, protocol):
    only_where_supported(broker, protocol)
    config = settings_for(broker, prefix)
    kept, moved = config.names.full_topic("kept"), config.names.full_topic("moved")
    specs = [TopicSpec(kept, 2, {}), TopicSpec(moved, 1, {})]
    assert set(create_topics(config.kafka.admin(), specs).values()) == {"created"}
    everything = frozenset({(kept, 0), (kept, 1), (moved, 0)})
    overrides = loop_overrides(broker, protocol)
    outage = threading.Event()
    outage.set()  # the destination is down from the start
    produce_to(config, moved, {0: 20})  # while refusing, only the partition that will move has data
    first, second = OutageStrategy(outage), OutageStrategy(outage)

    def make_loop(topics: list[str], strategy: OutageStrategy) -> ConsumerLoop:
        return ConsumerLoop(
            config.kafka, "loop", topics, strategy, batch_size=100, poll_timeout=0.1, overrides=overrides
        )

    started = time.monotonic()
    with member(make_loop([kept, moved], first)) as a:
        wait_for(lambda: a.assigned() == everything, 30, "the first member assigned every partition")
        # Refused, then offered again: the carry holds `moved`'s batch and every partition is paused.
        wait_for(lambda: first.refusals >= 2, 15, "the first member refusing work")
        with member(make_loop([moved], second)) as b:
            wait_for(
                lambda: first.revoked and a.assigned() | b.assigned() == everything and not a.assigned() & b.assigned(),
                60,
                "the group rebalanced over both members",
            )
            a_kept = a.assigned()
            if protocol == "range":
                assert first.revoked[0] == everything  # eager: everything was revoked, then assigned again
            else:
                # Incremental: only `moved` went, so the carry (all of it `moved`'s) emptied while the
                # first member kept the `kept` topic's partitions, paused.
                assert first.revoked[0] == {(moved, 0)}, first.revoked
                assert a_kept == {(kept, 0), (kept, 1)} and b.assigned() == {(moved, 0)}
            rebalanced = time.monotonic()
            produce_to(config, kept, {0: 10, 1: 10})
            produce_to(config, moved, {0: 10}, start=20)
            time.sleep(0.5)  # the outage outlasts the rebalance a little
            outage.clear()  # the destination is back
            wanted = {(kept, p, o) for p in (0, 1) for o in range(10)} | {(moved, 0, o) for o in range(30)}
            wait_for(
                lambda: first.finished() | second.finished() >= wanted,
                20,
                f"every message done ({protocol}); the first member kept {sorted(a_kept)}",
            )
            mine = {c for c in wanted if (c[0], c[1]) in a_kept}
            assert first.finished() >= mine, "the first member's kept partitions made no progress"
            b.stop()
        # The second member left once the group was stable; the first gets everything back.
        wait_for(lambda: a.assigned() == everything, 60, "the first member assigned every partition again")
        produce_to(config, kept, {0: 5, 1: 5}, start=10)
        more = {(kept, p, o) for p in (0, 1) for o in range(10, 15)}
        wait_for(lambda: first.finished() >= more, 20, "the first member consuming after the second left")
    print(
        f"{protocol} on {broker.kind}: rebalanced after {rebalanced - started:.1f}s, all done {time.monotonic() - started:.1f}s"
    )


# -- 2. KIP-848: the normaliser and a sink as real processes, a member joins and one leaves -----------

PARTITIONS = 4
RAW_EVENTS = 20_000
# Written at a steady rate for longer than the membership changes take (a KIP-848 member learns of
# a change at its next heartbeat: group.consumer.heartbeat.interval.ms, 5 s by default), so both
# groups are working under load when the second member joins and when the first leaves.
PRODUCE_SECONDS = 30.0


def rebalance_log(role: Role) -> list[tuple[str, frozenset[int]]]:
    """The role's "partitions assigned"/"partitions revoked" log lines, in order, as (kind, partitions);
    callbacks with no partitions (KIP-848 sends some) are left out."""
    events = []
    assert role.log_path is not None
    for line in role.log_path.read_text(errors="replace").splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # librdkafka's own lines
        if isinstance(record, dict) and record.get("event") in ("partitions assigned", "partitions revoked"):
            partitions = frozenset(int(name.rsplit("[", 1)[1].rstrip("]")) for name in record["partitions"])
            if partitions:
                events.append((record["event"].split()[1], partitions))
    return events


def owned(role: Role) -> frozenset[int]:
    held: set[int] = set()
    for kind, partitions in rebalance_log(role):
        if kind == "assigned":
            held |= partitions
        else:
            held -= partitions
    return frozenset(held)


def shared_out(first: Role, second: Role) -> bool:
    a, b = owned(first), owned(second)
    return bool(a) and bool(b) and not a & b and len(a | b) == PARTITIONS


def assert_incremental(first: Role, second: Role) -> None:
    """The first member gave up only what moved and kept the rest until its SIGTERM; the second was
    then given the rest on top of what it had, nothing revoked in between. (An eager group revokes
    everything at every rebalance and assigns it all again.)"""
    everything = frozenset(range(PARTITIONS))
    a, b = rebalance_log(first), rebalance_log(second)
    assert a[0] == ("assigned", everything), a
    assert len(a) >= 3 and all(kind == "revoked" for kind, _ in a[1:]), a  # kept what it was not asked for
    assert a[1][1] < everything, a  # at the join: a part only
    *given, last = b
    assert len(given) >= 2 and all(kind == "assigned" for kind, _ in given), b  # added to, never revoked
    assert frozenset().union(*(partitions for _, partitions in given)) == everything, b
    assert last == ("revoked", everything), b  # its own SIGTERM


def _raw(i: int) -> tuple[str, bytes]:
    user = f"user-{i % 97}"
    return user, orjson.dumps({"type": "track", "userId": user, "event": "Load", "messageId": f"m{i:05d}"})


class SteadyProducer:
    """Writes RAW_EVENTS raw events over PRODUCE_SECONDS on a thread of its own."""

    def __init__(self, settings: Config) -> None:
        self.settings = settings
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="steady-producer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        producer = self.settings.kafka.producer()
        topic = self.settings.names.raw
        chunks = 100
        started = time.monotonic()
        for chunk in range(chunks):
            for i in range(chunk * RAW_EVENTS // chunks, (chunk + 1) * RAW_EVENTS // chunks):
                key, value = _raw(i)
                producer.produce(topic, value, key, lambda e, _m: self.failures.append(str(e)) if e else None)
            producer.poll(0)
            time.sleep(max(0.0, started + (chunk + 1) * PRODUCE_SECONDS / chunks - time.monotonic()))
        if producer.flush(30):
            self.failures.append("not all raw events acknowledged")

    def producing(self) -> bool:
        return self.thread.is_alive()


def test_kip848_normaliser_and_sink_groups_rebalance_incrementally_under_load_without_loss(
    broker, prefix, clean_standins, tmp_path
):
    only_where_supported(broker, "consumer")
    standins = clean_standins
    settings = settings_for(
        broker, prefix, partitions=PARTITIONS, KAFKA_GROUP_PROTOCOL="consumer", DESTINATIONS="amplitude"
    )
    setup_topics(settings)
    started = time.monotonic()
    roles: list[Role] = []

    def normaliser() -> Role:
        roles.append(start_role(settings, ["normalize"], tmp_path))
        return roles[-1]

    def sink() -> Role:
        roles.append(start_sink(settings, "amplitude", standins, tmp_path))
        return roles[-1]

    try:
        first_normaliser, first_sink = normaliser(), sink()
        load = SteadyProducer(settings)
        wait_for(
            lambda: len(owned(first_normaliser)) == PARTITIONS, 30, "the first normaliser assigned every partition"
        )
        wait_for(lambda: len(owned(first_sink)) == PARTITIONS, 30, "the first sink assigned every partition")
        # One membership change at a time per group, each once its group is stable.
        second_normaliser, second_sink = normaliser(), sink()
        wait_for(lambda: shared_out(first_normaliser, second_normaliser), 45, "the normaliser group shared out")
        wait_for(lambda: shared_out(first_sink, second_sink), 45, "the sink group shared out")
        joined = time.monotonic() - started
        assert load.producing(), "the load ended before the first members left; raise PRODUCE_SECONDS"
        assert first_normaliser.terminate() == 0 and first_sink.terminate() == 0  # SIGTERM: drain, commit, leave
        wait_for(lambda: len(owned(second_normaliser)) == PARTITIONS, 45, "the second normaliser took every partition")
        wait_for(lambda: len(owned(second_sink)) == PARTITIONS, 45, "the second sink took every partition")
        left = time.monotonic() - started
        load.thread.join(PRODUCE_SECONDS + 40)
        assert not load.producing() and not load.failures, load.failures[:3]
        codec = EventCodec()
        wanted = {f"m{i:05d}" for i in range(RAW_EVENTS)}

        def ids(messages: list) -> set[str]:
            return {codec.decode(m.value())[0]["messageId"] for m in messages}

        normalised = ids(
            read(settings, "dest.amplitude", lambda seen: len(seen) >= RAW_EVENTS and ids(seen) >= wanted, timeout=60)
        )
        received = standins.wait_received("amplitude", RAW_EVENTS, timeout=60)
        assert second_normaliser.terminate() == 0 and second_sink.terminate() == 0
    finally:
        for role in roles:
            role.terminate()
    assert normalised == wanted, f"{len(wanted - normalised)} raw events never reached the dest topic"
    assert set(received) == wanted, f"{len(wanted - set(received))} events never reached the stand-in"
    assert_incremental(first_normaliser, second_normaliser)
    assert_incremental(first_sink, second_sink)
    print(
        f"KIP-848 roles: joined after {joined:.1f}s, first members left after {left:.1f}s, all {time.monotonic() - started:.1f}s"
    )


# -- 3. KIP-848 refuses the classic protocol's client-side settings --------------------------------------


CLASSIC_ONLY = {
    "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "1000",
    "partition.assignment.strategy": "cooperative-sticky",
    "group.protocol.type": "consumer",
}


def test_kip848_refuses_classic_only_consumer_settings_in_one_line():
    """What librdkafka refuses one property at a time when it creates the consumer, the client
    factory refuses all at once, naming each property's KAFKA_* variable; classic groups keep them."""
    base = {"bootstrap.servers": "127.0.0.1:1", "log_level": "0"}  # no broker: quiet its connection errors
    kip848 = KafkaClients({**base, "group.protocol": "consumer", **CLASSIC_ONLY}, "p-")
    for make in (lambda: kip848.consumer_config("sink-amplitude"), lambda: kip848.reader("tail")):
        with pytest.raises(ConfigError) as refused:
            make()
        message = str(refused.value)
        assert "\n" not in message and "KAFKA_GROUP_PROTOCOL=consumer" in message
        for name in CLASSIC_ONLY:
            assert f"{name} (KAFKA_{name.upper().replace('.', '_')})" in message, message
    # An override from code is refused the same way (the loop's overrides, say).
    with pytest.raises(ConfigError, match=r"partition\.assignment\.strategy"):
        KafkaClients({**base, "group.protocol": "Consumer"}).consumer_config(
            "x", {"partition.assignment.strategy": "range"}
        )
    # Without them librdkafka takes the configuration we build (our defaults hold none of them) ...
    for protocol in ("consumer", "classic"):
        Consumer(KafkaClients({**base, "group.protocol": protocol}).consumer_config("x")).close()
    # ... and librdkafka itself would have refused each one.
    for name, value in CLASSIC_ONLY.items():
        with pytest.raises(Exception, match=re.escape("not supported for `group.protocol=consumer`")):
            Consumer({**base, "group.id": "x", "group.protocol": "consumer", name: value})
    # A classic group takes them all.
    classic = KafkaClients({**base, "group.protocol": "classic", **CLASSIC_ONLY}).consumer_config("x")
    assert {k: classic[k] for k in CLASSIC_ONLY} == CLASSIC_ONLY


@pytest.mark.parametrize("command", [["normalize"], ["sink", "amplitude"]])
def test_a_role_with_a_classic_only_setting_under_kip848_stops_at_start_up_with_exit_2(command, tmp_path):
    env = {
        **standin_env("http://127.0.0.1:1"),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # refused before any connection is tried
        "KAFKA_GROUP_PROTOCOL": "consumer",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "DESTINATIONS": "amplitude",
        "TOPIC_PREFIX": "p.",
        "CONSUMER_GROUP_PREFIX": "p-",
    }
    role = Role(command, env, tmp_path / "role.log")
    try:
        assert role.process.wait(30) == 2
    finally:
        role.terminate()
    output = (tmp_path / "role.log").read_text()
    assert (
        "configuration error: KAFKA_GROUP_PROTOCOL=consumer (KIP-848) does not take session.timeout.ms (KAFKA_SESSION_TIMEOUT_MS)"
        in output
    ), output
    assert "Traceback" not in output, output
