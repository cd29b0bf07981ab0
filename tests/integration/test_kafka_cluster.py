"""The pipeline on a three-node Apache Kafka cluster (worker.kafka.apache_kafka.ApacheKafkaCluster):
topics replicated three times, then the collector, a normaliser and the Amplitude sink under load
while the node leading `<prefix>raw[0]` is killed with -9, and the node restarted afterwards.

Needs `java` (and `mvn` the first time, see worker.kafka.apache_kafka); without a JDK the module is
skipped with that reason. `--broker embedded` skips it too: it runs only Apache Kafka.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from confluent_kafka.admin import ConfigResource, ConfigSource

from tests.integration.test_collector import CollectorProcess
from tests.kafka_helpers import role_env, settings_for, settle, start_role
from tests.sink_helpers import Standins, start_sink
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.kafka.apache_kafka import ApacheKafkaCluster, ApacheKafkaNotFound, find_java
from worker.processes import Role
from worker.topics import topic_specs

pytestmark = pytest.mark.integration

NODES = 3
KEY = "wk_cluster"
REQUESTS_PER_SECOND = 40
EVENTS_PER_REQUEST = 5  # 200 events/s
USERS = 60
MIN_LOAD_SECONDS = 15.0
LOAD_AFTER_RECOVERY_SECONDS = 4.0  # requests still sent once a post-kill request was answered 200
MAX_LOAD_SECONDS = 45.0
CODEC = EventCodec()
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafkaCluster]:
    if request.config.getoption("--broker") == "embedded":
        pytest.skip("the cluster tests run Apache Kafka only; --broker=embedded was chosen")
    try:
        find_java()
    except ApacheKafkaNotFound as exc:  # reported as skipped with its reason, never as passed
        pytest.skip(f"Apache Kafka cluster: {exc}")
    log_dir = tmp_path_factory.mktemp("kafka-cluster")
    running = ApacheKafkaCluster(NODES, log_dir=log_dir)
    started = time.monotonic()
    try:
        running.start()
    except ApacheKafkaNotFound as exc:
        pytest.fail(f"Apache Kafka cluster could not start: {exc}")
    print(
        f"\ncluster of {NODES} up in {time.monotonic() - started:.1f}s on {running.bootstrap_servers} (logs {log_dir})"
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def pipeline(cluster: ApacheKafkaCluster) -> tuple[Config, str]:
    """The module's namespace, its topics created by the real `topics create` command."""
    prefix = f"c{uuid.uuid4().hex[:8]}."
    config = settings_for(cluster, prefix, partitions=3, TOPIC_REPLICATION_FACTOR=str(NODES), DESTINATIONS="amplitude")
    done = subprocess.run(
        [sys.executable, "-m", "worker", "topics", "create"],
        env={**os.environ, **role_env(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return config, done.stdout


def test_topics_are_replicated_three_times_with_two_in_sync_required(
    cluster: ApacheKafkaCluster, pipeline: tuple[Config, str]
) -> None:
    config, output = pipeline
    names = [spec.name for spec in topic_specs(config)]
    assert sorted(line.split() for line in output.splitlines()) == sorted(["created", n] for n in names)

    admin = cluster.admin()
    metadata = admin.list_topics(timeout=10)
    for name in names:
        partitions = metadata.topics[name].partitions
        assert len(partitions) == 3, name
        for partition in partitions.values():
            assert sorted(partition.replicas) == [1, 2, 3], (name, partition.id, partition.replicas)
            assert sorted(partition.isrs) == [1, 2, 3], (name, partition.id, partition.isrs)

    described = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    sources = {}
    for resource, future in described.items():
        entries = future.result(timeout=10)
        min_isr = entries["min.insync.replicas"]
        assert min_isr.value == "2", (resource.name, min_isr)  # effective: what acks=all waits for
        sources[resource.name] = getattr(min_isr.source, "name", ConfigSource(min_isr.source).name)
    # worker/topics.py sets no min.insync.replicas of its own: the 2 is the cluster's broker default
    # (STATIC_BROKER_CONFIG); on a broker left at Kafka's default of 1, acks=all would wait for one copy.
    print(f"\nmin.insync.replicas sources: {sorted(set(sources.values()))}")


# -- under load, a broker killed ----------------------------------------------------------------------


@dataclass
class Answer:
    seq: int
    ids: list[str]
    sent: float
    answered: float = 0.0
    status: int = 0  # HTTP status; -1: no answer (connection error, timeout)


@dataclass
class Load:
    """Segment batches posted at a steady rate from a thread of its own (its own asyncio loop), each
    request on its own task so that requests stuck waiting for Kafka do not slow the rate down."""

    url: str
    prefix: str
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = []
            self.started = time.monotonic()
            seq = 0
            while not self.stop.is_set():
                tasks.append(asyncio.create_task(self._post(session, seq)))
                seq += 1
                await asyncio.sleep(max(0.0, self.started + seq / REQUESTS_PER_SECOND - time.monotonic()))
            await asyncio.gather(*tasks)

    async def _post(self, session: aiohttp.ClientSession, seq: int) -> None:
        user = f"user-{seq % USERS:03d}"
        ids = [f"{self.prefix}{seq:06d}-{i}" for i in range(EVENTS_PER_REQUEST)]
        batch = [
            {"type": "track", "userId": user, "event": "Cluster Load", "messageId": m, "properties": {"seq": seq}}
            for m in ids
        ]
        answer = Answer(seq, ids, time.monotonic())
        self.answers.append(answer)
        try:
            async with session.post(f"{self.url}/v1/batch", json={"batch": batch}, headers=AUTH) as response:
                await response.read()
                answer.status = response.status
        except (aiohttp.ClientError, TimeoutError):
            answer.status = -1
        answer.answered = time.monotonic()


class Deliveries:
    """When each insert_id first reached the Amplitude stand-in, and whether the roles still run,
    sampled from a thread every `interval` seconds."""

    def __init__(self, standins: Standins, roles: dict[str, Role], interval: float = 0.5) -> None:
        self.standins = standins
        self.roles = roles
        self.interval = interval
        self.first_seen: dict[str, float] = {}
        self.exited: dict[str, tuple[float, int | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="deliveries", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except OSError as exc:  # a slow stand-in answer: sample again next time
                print(f"sampling deliveries failed: {exc}")

    def sample(self) -> None:
        now = time.monotonic()
        for insert_id in self.standins.received("amplitude"):
            self.first_seen.setdefault(insert_id, now)
        for name, role in self.roles.items():
            if not role.alive() and name not in self.exited:
                self.exited[name] = (now, role.process.returncode)

    def wait_for(self, ids: set[str], timeout: float) -> set[str]:
        """The ids of `ids` still missing after up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (missing := ids - self.first_seen.keys()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return missing

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.sample()


def _wait(condition, timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until `condition()` held (exceptions count as not yet), or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if condition():
                return time.monotonic() - started
        except Exception:
            pass
        time.sleep(interval)
    return None


def test_kill_9_of_the_raw_leader_under_load_loses_no_acknowledged_event(
    cluster: ApacheKafkaCluster, pipeline: tuple[Config, str], standins: Standins, tmp_path: Path
) -> None:
    config, _ = pipeline
    raw = config.names.raw
    standins.reset_all()
    began = time.monotonic()
    collector = CollectorProcess(role_env(config, COLLECTOR_WRITE_KEYS=KEY), tmp_path / "collect.log")
    normaliser = start_role(config, ["normalize"], tmp_path)
    sink = start_sink(config, "amplitude", standins, tmp_path)
    roles = {"collect": collector.role, "normalize": normaliser, "sink amplitude": sink}
    deliveries = Deliveries(standins, roles)
    load = Load(collector.url, f"{config.names.raw}-")
    poster = threading.Thread(target=load.run, name="load", daemon=True)
    victim: int | None = None
    try:
        poster.start()
        # The pipeline runs end to end before anything is killed.
        assert _wait(lambda: len(deliveries.first_seen) >= 100, 30) is not None, "nothing delivered before the kill"
        time.sleep(max(0.0, load.started + 4.0 - time.monotonic()))

        victim = cluster.leader_of(raw, 0)
        leaders_before = {p: cluster.leader_of(raw, p) for p in range(3)}
        cluster.kill(victim)
        killed = time.monotonic()
        delivered_at_kill = len(deliveries.first_seen)

        elected = _wait(lambda: cluster.leader_of(raw, 0, timeout=2) not in (victim, -1), 40)
        assert elected is not None, f"no new leader for {raw}[0] within 40s of killing node {victim}"
        new_leader = cluster.leader_of(raw, 0)

        def ok_sent_after(moment: float) -> list[Answer]:
            return [a for a in list(load.answers) if a.sent >= moment and a.status == 200]

        assert _wait(lambda: ok_sent_after(killed + elected), 40) is not None, "no 200 after the election in 40s"
        end_load = max(load.started + MIN_LOAD_SECONDS, time.monotonic() + LOAD_AFTER_RECOVERY_SECONDS)
        time.sleep(max(0.0, min(end_load, load.started + MAX_LOAD_SECONDS) - time.monotonic()))
        load.stop.set()
        poster.join(60)
        assert not poster.is_alive()
        load_seconds = time.monotonic() - load.started

        answers = load.answers
        ok = {i for a in answers if a.status == 200 for i in a.ids}
        refused = [a for a in answers if a.status == 503]
        other = [a for a in answers if a.status not in (200, 503)]
        missing = deliveries.wait_for(ok, 60)
        deliveries.close()
        received = set(standins.received("amplitude"))
        stats = standins.stats("amplitude")
        raw_messages = settle(config, "raw", 3)
        raw_events = [e["messageId"] for m in raw_messages for e in orjson.loads(m.value())["batch"]]
        dest_events = [CODEC.decode(m.value())[0]["messageId"] for m in settle(config, "dest.amplitude", 3)]

        after_kill, after_election = ok_sent_after(killed), ok_sent_after(killed + elected)
        first_200 = min(a.answered for a in after_kill) - killed
        fast_again = min((a.sent for a in after_kill if a.answered - a.sent < 1.0), default=float("nan")) - killed
        first_seen = [deliveries.first_seen.get(i, float("nan")) for a in after_election for i in a.ids]
        refused_ids = {i for a in refused for i in a.ids}
        print(
            f"\nnode {victim} killed {killed - load.started:.1f}s into {load_seconds:.1f}s of load (leaders of "
            f"{raw} before: {leaders_before}; {raw}[0] now led by {new_leader})\n"
            f"sent {len(answers)} requests / {len(answers) * EVENTS_PER_REQUEST} events: 200 to "
            f"{len(ok) // EVENTS_PER_REQUEST} ({len(ok)} events), 503 to {len(refused)} ({len(refused_ids)} events), "
            f"other {len(other)} {sorted({a.status for a in other})}\n"
            f"after the kill: new leader of {raw}[0] seen at {elected:.1f}s; first 200 to a request sent after "
            f"the kill at {first_200:.1f}s; requests answered in < 1s again from {fast_again:.1f}s; first delivery "
            f"of an event sent after the election at {min(first_seen) - killed:.1f}s\n"
            f"delivered {len(received)} distinct events (at the kill {delivered_at_kill}); stand-in duplicates "
            f"{stats['duplicates']}, statuses {stats['statuses']}; raw holds {len(raw_events)} events "
            f"({len(set(raw_events))} distinct), dest.amplitude {len(dest_events)} ({len(set(dest_events))} distinct); "
            f"events answered 503 but stored anyway: {len(refused_ids & set(raw_events))} in raw, "
            f"{len(refused_ids & received)} delivered"
        )
        # Where a raw message was written more than once (no request here is ever retried).
        copies: dict[int, list[tuple[int, int]]] = {}
        for m in raw_messages:
            seq = int(orjson.loads(m.value())["batch"][0]["messageId"].rsplit("-", 2)[-2][-6:])
            copies.setdefault(seq, []).append((m.partition(), m.offset()))
        twice = {seq: places for seq, places in copies.items() if len(places) > 1}
        by_seq = {a.seq: a for a in answers}
        replaced = collector.log_path.read_text().count("replacing the producer")
        print(
            f"raw messages written more than once: {len(twice)} (statuses of their requests "
            f"{sorted({by_seq[q].status for q in twice})}, sent {min((by_seq[q].sent - killed for q in twice), default=0):+.1f}s "
            f"to {max((by_seq[q].sent - killed for q in twice), default=0):+.1f}s from the kill, e.g. "
            f"{dict(list(sorted(twice.items()))[:3])}); the collector replaced its producer {replaced} times"
        )
        print("seconds from the kill  requests sent  200  503  slowest answer (s)  events first delivered")
        for low in range(-4, 18, 2):
            sent = [a for a in answers if low <= a.sent - killed < low + 2]
            statuses = [a.status for a in sent]
            slowest = max((a.answered - a.sent for a in sent), default=0.0)
            delivered = sum(low <= t - killed < low + 2 for t in deliveries.first_seen.values())
            print(
                f"  [{low:+3d}, {low + 2:+3d})  {len(sent):19d}  {statuses.count(200):3d}  {statuses.count(503):3d}"
                f"  {slowest:18.1f}  {delivered:22d}"
            )

        assert not missing, f"{len(missing)} events answered 200 never reached Amplitude, e.g. {sorted(missing)[:5]}"
        assert deliveries.exited == {}, f"roles exited: {deliveries.exited}"
        assert all(role.alive() for role in roles.values())
        assert other == [], f"{len(other)} requests neither 200 nor 503"
        assert after_election, "nothing sent after the election was acknowledged"

        # The killed node drops out of the metadata, then rejoins once restarted.
        assert _wait(lambda: victim not in cluster.brokers(timeout=2), 30) is not None, cluster.brokers()
        restarted = time.monotonic()
        cluster.restart(victim)
        listed = time.monotonic() - restarted
        assert victim in cluster.brokers()
        in_isr: dict[str, float] = {}

        def rejoined() -> bool:
            isrs = [cluster.isr_of(raw, p, timeout=2) for p in range(3)]
            if any(victim in isr for isr in isrs):
                in_isr.setdefault("some", time.monotonic() - restarted)
            if all(victim in isr for isr in isrs):
                in_isr.setdefault("all", time.monotonic() - restarted)
            return "all" in in_isr

        _wait(rejoined, 30)
        print(
            f"node {victim} restarted: listed again after {listed:.1f}s, in an ISR of {raw} after "
            f"{in_isr.get('some', float('nan')):.1f}s, in all three after {in_isr.get('all', float('nan')):.1f}s"
        )
        assert "some" in in_isr, f"node {victim} in no ISR of {raw} 30s after its restart"
        assert "all" in in_isr, f"node {victim} not back in every ISR of {raw} 30s after its restart"
        for name, role in roles.items():
            assert role.alive(), f"{name} exited with {role.process.returncode}; log {role.log_path}"
        print(f"whole test {time.monotonic() - began:.1f}s (cluster start not included)")
    finally:
        load.stop.set()
        poster.join(60)
        deliveries.close()
        codes = {name: role.terminate() for name, role in reversed(roles.items())}
        if victim is not None and not cluster.node(victim).alive():
            cluster.restart(victim)  # the module's cluster stays whole for whoever comes next
    assert codes == {"sink amplitude": 0, "normalize": 0, "collect": 0}, codes
