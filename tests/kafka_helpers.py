"""Helpers for integration tests: configuration for a test's namespace, producing, reading back, roles."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Message

from worker.config import Config
from worker.kafka.broker import LoopbackBroker
from worker.kafka.reading import assign_all, read_batches_until_quiet
from worker.processes import Role
from worker.topics import create_all


def settings_for(broker: LoopbackBroker, prefix: str, partitions: int = 4, **variables: str) -> Config:
    """A configuration of the test's own namespace, built by the same loader the CLI uses, with the
    client settings only the broker under test needs (none on Apache Kafka)."""
    return Config.from_sources(
        {
            **broker.client_workarounds,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "TOPIC_PREFIX": prefix,
            "CONSUMER_GROUP_PREFIX": prefix,
            "TOPIC_PARTITIONS": str(partitions),
            **variables,
        }
    )


# A member killed with -9 holds its partitions until its session times out (librdkafka's default:
# 45 s). Tests that kill -9 choose the lowest session timeout a default Apache Kafka accepts
# (group.min.session.timeout.ms), as an operator who wants fast failover would; the embedded
# broker's own workaround, where it has one, still wins.
CRASH_TEST_VARIABLES = {"KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}


def crash_test_variables(broker: LoopbackBroker) -> dict[str, str]:
    return {**CRASH_TEST_VARIABLES, **broker.client_workarounds}


def role_env(config: Config, **extra: str) -> dict[str, str]:
    """The environment of a role process started for this configuration."""
    return {**config.sources, **extra}


def setup_topics(config: Config) -> None:
    create_all(config)


def produce(config: Config, topic: str, items: list[tuple[str | None, bytes | None]]) -> None:
    config.kafka.produce_and_wait(config.names.full_topic(topic), items)


def read(
    config: Config,
    topic: str,
    until: Callable[[list[Message]], bool],
    timeout: float = 60.0,
) -> list[Message]:
    """Read a topic from the beginning until `until(messages)` holds or the timeout passes."""
    consumer = config.kafka.reader("test-reader")
    try:
        assign_all(consumer, [config.names.full_topic(topic)])
        seen: list[Message] = []
        if until(seen):
            return seen
        for messages in read_batches_until_quiet(consumer, None, time.monotonic() + timeout, batch=1000):
            seen.extend(messages)
            if until(seen):
                break
        return seen
    finally:
        consumer.close()


def read_count(config: Config, topic: str, count: int, timeout: float = 60.0) -> list[Message]:
    return read(config, topic, lambda seen: len(seen) >= count, timeout)


def settle(config: Config, topic: str, timeout: float = 3.0) -> list[Message]:
    """Everything on a topic after it has been quiet for a while (to see that nothing more arrives)."""
    return read(config, topic, lambda _seen: False, timeout)


def start_role(config: Config, args: list[str], log_dir: Path, **extra_env: str) -> Role:
    name = "-".join(args)
    return Role(args, role_env(config, **extra_env), log_dir / f"{name}-{time.monotonic_ns()}.log")
