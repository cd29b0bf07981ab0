"""worker.kafka.apache_kafka: a real Apache Kafka broker from Maven Central, no Docker.

The integration tests start the JVM broker (needing `java`, and `mvn` the first time); when either
is missing they fail with ApacheKafkaNotFound naming it, never skip. The rest check resolving and
its errors with a stand-in `mvn` and need neither.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Consumer, ConsumerGroupType, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from worker.kafka import apache_kafka
from worker.kafka.apache_kafka import (
    KAFKA_VERSION,
    MARKER,
    ApacheKafkaBroker,
    ApacheKafkaNotFound,
    cluster_id,
    find_java,
    resolve,
)
from worker.kafka.broker import BrokerNotFound, free_port

MESSAGES = 100


# -- resolving, with a stand-in mvn ------------------------------------------------------------------


@pytest.fixture
def no_libs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(apache_kafka.LIBS_ENV, raising=False)


def _stub_mvn(bin_dir: Path, calls: Path, exit_code: int = 0) -> None:
    """An `mvn` that records each call and 'copies' a kafka_2.13 jar into -DoutputDirectory."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "mvn"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, pathlib\n"
        f"pathlib.Path({str(calls)!r}).open('a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"if {exit_code}:\n"
        "    print('[ERROR] Could not resolve dependencies: stand-in failure')\n"
        f"    sys.exit({exit_code})\n"
        "out = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('-DoutputDirectory='))\n"
        "version = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('-Dkafka.version='))\n"
        "pathlib.Path(out, f'kafka_2.13-{version}.jar').write_bytes(b'')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_second_resolve_does_not_run_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_libs_env: None) -> None:
    calls = tmp_path / "calls"
    _stub_mvn(tmp_path / "bin", calls)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    libs = tmp_path / "cache" / "libs"

    assert resolve(libs=libs) == libs
    assert (libs / MARKER).is_file()
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()
    first = calls.read_text().splitlines()
    assert len(first) == 1
    assert f"-Dkafka.version={KAFKA_VERSION}" in first[0]
    assert f"-f {apache_kafka.POM}" in first[0]

    started = time.monotonic()
    assert resolve(libs=libs) == libs
    assert time.monotonic() - started < 0.5
    assert calls.read_text().splitlines() == first  # mvn was not run again


def test_missing_mvn_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_libs_env: None) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no mvn
    with pytest.raises(ApacheKafkaNotFound, match="no `mvn` on PATH"):
        resolve(libs=tmp_path / "libs")
    assert not (tmp_path / "libs").exists()


def test_failed_resolve_is_reported_and_not_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_libs_env: None
) -> None:
    _stub_mvn(tmp_path / "bin", tmp_path / "calls", exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ApacheKafkaNotFound, match=r"(?s)mvn could not resolve.*stand-in failure"):
        resolve(libs=tmp_path / "libs")
    assert not (tmp_path / "libs").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("libs.partial")] == []


def test_libs_env_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"kafka_2.13-{KAFKA_VERSION}.jar").write_bytes(b"")
    monkeypatch.setenv(apache_kafka.LIBS_ENV, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no mvn, none needed
    assert resolve() == tmp_path
    monkeypatch.setenv(apache_kafka.LIBS_ENV, str(tmp_path / "absent"))
    with pytest.raises(ApacheKafkaNotFound, match="is not a directory"):
        resolve()


def test_missing_java_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ApacheKafkaNotFound, match="no `java`"):
        find_java()
    with pytest.raises(BrokerNotFound, match="no `java`"):
        ApacheKafkaBroker().start()


def test_compose_runs_the_same_kafka() -> None:
    """docker-compose.yml's apache/kafka image is the release the tests run against."""
    compose = yaml.safe_load((Path(apache_kafka.REPO_ROOT) / "docker-compose.yml").read_text())
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_cluster_id_is_a_kafka_uuid() -> None:
    for _ in range(200):
        value = cluster_id()
        assert len(value) == 22 and not value.startswith("-")
        assert len(base64.urlsafe_b64decode(value + "==")) == 16


# -- the real broker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apache_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafkaBroker]:
    log_path = tmp_path_factory.mktemp("apache-kafka") / "kafka.log"
    with ApacheKafkaBroker(log_path=log_path) as running:
        yield running


@pytest.fixture(scope="module")
def produced(apache_broker: ApacheKafkaBroker) -> tuple[str, list[bytes]]:
    """A one-partition topic holding MESSAGES messages, written by one produce request (one batch)."""
    topic = f"apache-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": apache_broker.bootstrap_servers})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)

    stats: list[dict] = []
    delivered: list[Message] = []
    producer = Producer(
        {
            "bootstrap.servers": apache_broker.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1000,  # everything below is queued well within this
            "statistics.interval.ms": 100,
            "stats_cb": lambda raw: stats.append(json.loads(raw)),
        }
    )
    producer.list_topics(topic, timeout=10)  # connected, so the batch is not split by a slow start
    values = [f"message-{i}".encode() for i in range(MESSAGES)]
    for i, value in enumerate(values):
        producer.produce(topic, value, key=str(i), partition=0, on_delivery=lambda err, msg: delivered.append(msg))
    assert producer.flush(30) == 0
    deadline = time.monotonic() + 1.0  # collect the statistics window the batch was counted in
    while time.monotonic() < deadline:
        producer.poll(0.05)

    assert [m.error() for m in delivered] == [None] * MESSAGES
    assert sorted(m.offset() for m in delivered) == list(range(MESSAGES))
    # librdkafka's per-topic batch statistics: exactly one batch, of all the messages.
    counts = [s["topics"][topic]["batchcnt"] for s in stats if topic in s["topics"]]
    assert sum(c["cnt"] for c in counts) == 1, counts
    assert max(c["max"] for c in counts) == MESSAGES, counts
    return topic, values


@pytest.mark.integration
def test_cached_resolve_needs_no_mvn(apache_broker: ApacheKafkaBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker fixture has resolved the real jars; from the cache that needs no mvn at all."""
    if os.environ.get(apache_kafka.LIBS_ENV):
        pytest.fail(f"unset {apache_kafka.LIBS_ENV} to test the Maven cache")
    libs = apache_kafka.libs_dir()
    assert (libs / MARKER).is_file()
    monkeypatch.setenv("PATH", "/nonexistent")
    started = time.monotonic()
    assert resolve() == libs
    assert time.monotonic() - started < 0.5
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


@pytest.mark.integration
def test_high_watermark_after_one_batch(apache_broker: ApacheKafkaBroker, produced: tuple[str, list[bytes]]) -> None:
    topic, _ = produced
    consumer = Consumer({"bootstrap.servers": apache_broker.bootstrap_servers, "group.id": "watermarks"})
    try:
        assert consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10) == (0, MESSAGES)
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_consumer_group_reads_everything(
    apache_broker: ApacheKafkaBroker, produced: tuple[str, list[bytes]], protocol: str
) -> None:
    """Both group protocols, the KIP-848 one (`group.protocol=consumer`) included, against the real broker."""
    topic, values = produced
    group = f"{topic}-{protocol}"
    consumer = Consumer(
        {
            "bootstrap.servers": apache_broker.bootstrap_servers,
            "group.id": group,
            "group.protocol": protocol,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        seen: list[Message] = []
        deadline = time.monotonic() + 60
        while len(seen) < MESSAGES and time.monotonic() < deadline:
            for message in consumer.consume(MESSAGES, 0.5):
                assert message.error() is None, message.error()
                seen.append(message)
        assert [m.value() for m in seen] == values
        assert [m.offset() for m in seen] == list(range(MESSAGES))
        consumer.commit(asynchronous=False)
        assert consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == MESSAGES

        admin = AdminClient({"bootstrap.servers": apache_broker.bootstrap_servers})
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        expected = ConsumerGroupType.CONSUMER if protocol == "consumer" else ConsumerGroupType.CLASSIC
        assert description.type == expected
        assert len(description.members) == 1
    finally:
        consumer.close()


@pytest.mark.integration
def test_stop_ends_the_process_and_removes_storage(tmp_path: Path) -> None:
    broker = ApacheKafkaBroker(log_path=tmp_path / "kafka.log")
    with broker:
        assert broker.process is not None and broker.process.poll() is None
        pid, workdir = broker.process.pid, broker.workdir
        assert workdir is not None and (workdir / "data" / "meta.properties").is_file()
    assert broker.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), timeout=0.5).close()
    logged = (tmp_path / "kafka.log").read_text()
    assert " WARN " in logged  # log4j2's file appender (a fresh KRaft node warns on controller activation)
    assert "SLF4J" not in logged  # slf4j found its log4j2 binding


@pytest.mark.integration
def test_run_foreground_serves_until_sigterm() -> None:
    """What `segment-worker broker --apache-kafka` runs: up, answering, and exiting 0 on SIGTERM."""
    port = free_port()
    code = f"from worker.kafka.apache_kafka import run_foreground; raise SystemExit(run_foreground({port}))"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once start() has had a metadata answer
        assert f"Apache Kafka {KAFKA_VERSION}" in line and f"127.0.0.1:{port}" in line, line
        metadata = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10)
        assert list(metadata.brokers) == [1]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
