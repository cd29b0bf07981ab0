"""`segment-worker demo`: the whole pipeline on one machine with the embedded broker (or, with
`--broker apache-kafka`, Apache Kafka from its Maven Central jars).

Starts the broker, creates the topics, starts the stand-in destinations, the collector, the
normaliser and the four sinks as child processes; sends sample traffic (several users, every
event type, web and mobile user agents, batch envelopes) through the collector's Segment HTTP API
and poison input straight to segment.raw; waits until every sink has
committed everything on its topic; prints what each destination received, what was filtered and
what was dead-lettered, with reasons; stops everything it started. Exits non-zero if anything
went missing.
"""

from __future__ import annotations

import base64
import contextlib
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Message, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from worker.avro_codec import EventCodec
from worker.config import Config
from worker.dlq.headers import header_map
from worker.kafka.broker import EmbeddedBroker, LoopbackBroker, free_port, wait_for_port
from worker.kafka.clients import KafkaClients
from worker.kafka.reading import assign_all, partitions_of, read_until_quiet
from worker.names import RAW, sink_role
from worker.processes import Role
from worker.samples import sample_payloads
from worker.standins.server import standin_env
from worker.tail import decode_value
from worker.topics import create_all

DEADLINE_SECONDS = 90


def _say(text: str = "") -> None:
    # A closed stdout (`make demo | head`) must not skip the clean-up that follows the output.
    with contextlib.suppress(BrokenPipeError):
        print(text, flush=True)


WRITE_KEY = "demo-write-key"


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()  # Segment's Basic auth: key as user
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def send_through_collector(base: str, payloads: list[tuple[str, bytes]]) -> None:
    """Single events to /v1/<type>, batch envelopes to /v1/batch; each answered only once Kafka has them."""
    for _key, body in payloads:
        document = orjson.loads(body)
        path = "/v1/batch" if "batch" in document else f"/v1/{document['type']}"
        status, answer = _post(base + path, body)
        if status != 200:
            raise RuntimeError(f"collector answered {status} to {path}: {answer[:200]!r}")
    status, answer = _post(base + "/v1/track", b'{"type": "track", "userId": ')
    _say(f"      a malformed request is refused before anything is written: {status} {answer.decode()}")


def read_topics(clients: KafkaClients, topics: list[str], quiet: float = 1.0) -> dict[str, list[Message]]:
    """Everything on `topics`, read from the beginning until nothing new arrives for `quiet` seconds."""
    consumer = clients.reader("demo-reader")
    seen: dict[str, list[Message]] = {t: [] for t in topics}
    try:
        assign_all(consumer, topics)
        for message in read_until_quiet(consumer, quiet, time.monotonic() + DEADLINE_SECONDS):
            seen[message.topic()].append(message)
    finally:
        consumer.close()
    return seen


def committed_total(clients: KafkaClients, role: str, topic: str) -> int:
    """Messages a consumer group has committed on a topic (offsets count from 0, nothing is compacted)."""
    consumer = clients.consumer(role, {"enable.auto.commit": "false"})
    try:
        partitions = partitions_of(consumer, topic)
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in committed)
    finally:
        consumer.close()


def scrape(port: int) -> dict[str, float]:
    """A role's counters, flattened to 'name{label=value,...}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return orjson.loads(response.read())


class Stack:
    """Every process the demo starts, stopped by PID in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.roles: list[tuple[str, Role, int]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> int:
        metrics_port = free_port()
        role = Role(args, {**env, "METRICS_PORT": str(metrics_port)}, self.workdir / f"{name}.log")
        self.roles.append((name, role, metrics_port))
        return metrics_port

    def check_alive(self) -> None:
        for name, role, _port in self.roles:
            if not role.alive():
                raise RuntimeError(f"{name} exited with {role.process.returncode}; see {role.log_path}")

    def stop(self) -> None:
        for _name, role, _port in reversed(self.roles):
            role.terminate()


def start_broker(kind: str, workdir: Path, tansu_bin: str | None) -> LoopbackBroker:
    """The embedded broker (the default), or Apache Kafka from its Maven Central jars."""
    if kind == "apache-kafka":
        from worker.kafka.apache_kafka import KAFKA_VERSION, ApacheKafkaBroker

        broker: LoopbackBroker = ApacheKafkaBroker(log_path=workdir / "broker.log")
        _say(f"[1/6] starting Apache Kafka {KAFKA_VERSION} on {broker.bootstrap_servers} (logs in {workdir})")
    else:
        broker = EmbeddedBroker(free_port(), log_path=workdir / "broker.log", binary=tansu_bin)
        _say(f"[1/6] starting the embedded broker on {broker.bootstrap_servers} (logs in {workdir})")
    broker.start()
    return broker


def run_demo(
    config: Config, tansu_bin: str | None = None, keep_running: bool = False, broker_kind: str = "embedded"
) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="segment-demo-"))
    broker = start_broker(broker_kind, workdir, tansu_bin)
    config = Config.from_sources(
        {**config.sources, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "TOPIC_PARTITIONS": "3"}
    )
    settings, names = config.settings, config.names
    stack = Stack(workdir)
    try:
        _say("[2/6] creating topics")
        create_all(config)
        standins_port = free_port()
        base = f"http://127.0.0.1:{standins_port}"
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "TOPIC_PREFIX": settings.topic_prefix,
            "CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
            "DESTINATIONS": ",".join(settings.destinations),
            **broker.client_workarounds,
            **standin_env(base),
        }
        _say(f"[3/6] starting the stand-in destinations on {base}")
        stack.start("standins", ["standins", "--port", str(standins_port)], env)
        wait_for_port("127.0.0.1", standins_port, 15)
        collector_port = free_port()
        _say(f"[4/6] starting the collector on http://127.0.0.1:{collector_port}, the normaliser and the sinks")
        stack.start("collect", ["collect", "--port", str(collector_port)], {**env, "COLLECTOR_WRITE_KEYS": WRITE_KEY})
        stack.start("normalize", ["normalize"], env)
        for destination in settings.destinations:
            stack.start(sink_role(destination), ["sink", destination], env)
        wait_for_port("127.0.0.1", collector_port, 30)
        payloads, good, poison = sample_payloads()
        good_payloads = payloads[: len(payloads) - len(poison)]
        _say(f"[5/6] sending {good} events in {len(good_payloads)} requests through the collector (Segment HTTP API)")
        send_through_collector(f"http://127.0.0.1:{collector_port}", good_payloads)
        _say(f"      and {len(poison)} poison messages straight to {names.raw}, as a Kafka producer would")
        config.kafka.produce_and_wait(names.raw, [("poison", p) for p in poison])
        _say("[6/6] waiting until every sink has committed everything on its topic")
        ok = _wait_and_report(config, stack, base, good, len(poison))
        if keep_running:
            _say(
                "\nthe stack is up. Send more events with any Segment SDK or curl:\n"
                f"  curl -u {WRITE_KEY}: http://127.0.0.1:{collector_port}/v1/track "
                """-H 'Content-Type: application/json' -d '{"userId": "u1", "event": "Tried It"}'\n"""
                f"read them back:\n  KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers} "
                "segment-worker tail dest.amplitude --from-beginning\n"
                f"what the destinations got: {base}/_standin/amplitude/received\nCtrl-C to stop"
            )
            try:
                while True:
                    stack.check_alive()
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        _say("stopping every process the demo started")
        stack.stop()
        broker.stop()


def _wait_and_report(config: Config, stack: Stack, base: str, good: int, poison: int) -> bool:
    settings, names, clients = config.settings, config.names, config.kafka
    dest_topics = {d: names.dest(d) for d in settings.destinations}
    deadline = time.monotonic() + DEADLINE_SECONDS
    pending = dict(dest_topics)
    while time.monotonic() < deadline:
        stack.check_alive()
        topics = read_topics(clients, list(dest_topics.values()), quiet=0.3)
        for destination, topic in list(pending.items()):
            done = committed_total(clients, sink_role(destination), topic)
            if len(topics[topic]) == good and done == good:
                _say(f"      {destination}: all {good} events delivered or dead-lettered, offsets committed")
                del pending[destination]
        if not pending:
            break
        time.sleep(0.5)
    ok = not pending
    for destination in pending:
        _say(f"      {destination}: NOT FINISHED within {DEADLINE_SECONDS}s")

    codec = EventCodec()
    dlq_topics = {d: names.dlq(d) for d in [RAW, *settings.destinations]}
    dead = read_topics(clients, list(dlq_topics.values()), quiet=0.5)
    sinks = {sink_role(d) for d in settings.destinations}
    metrics = {name: scrape(port) for name, _role, port in stack.roles if name in sinks}
    _say()
    _say(f"{'destination':12} {'events':>6} {'API items':>12} {'filtered':>8} {'dead letters':>12}")
    for destination in settings.destinations:
        received = _get_json(f"{base}/_standin/{destination}/received")
        filtered = {
            key.split("reason=")[1].rstrip("}"): value
            for key, value in metrics[sink_role(destination)].items()
            if key.startswith("segment_worker_filtered_total{") and value
        }
        letters = dead[dlq_topics[destination]]
        _say(f"{destination:12} {good:>6} {len(received):>12} {int(sum(filtered.values())):>8} {len(letters):>12}")
        for reason, count in sorted(filtered.items()):
            _say(f"    filtered {int(count)}: {reason}")
        for message in letters:
            headers = header_map(message.headers())
            _say(f"    dead letter [{headers.get('error_kind')}] {headers.get('error')}")
        ok &= bool(received)
    for destination in settings.destinations:
        received = _get_json(f"{base}/_standin/{destination}/received")
        if received:
            key, payload = next(iter(received.items()))
            _say(f"\n{destination} received, e.g. (dedupe key {key}):")
            _say(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
    raw_letters = dead[dlq_topics[RAW]]
    _say(f"\n{names.dlq(RAW)}: {len(raw_letters)}/{poison} poison messages dead-lettered by the normaliser")
    for message in raw_letters:
        headers = header_map(message.headers())
        _say(f"    [{headers.get('error_kind')}] {headers.get('error')}")
    ok &= len(raw_letters) == poison
    sample = next(iter(read_topics(clients, [names.dest(settings.destinations[0])], quiet=0.3).values()), [])
    types = Counter(decode_value(m.value(), codec)["type"] for m in sample)
    _say(f"\nevents by type on the destination topics: {dict(sorted(types.items()))}")
    _say("\nall sample events accounted for" if ok else "\nSOME EVENTS ARE NOT ACCOUNTED FOR")
    return ok
