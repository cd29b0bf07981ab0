"""Helpers for integration tests: settings for a test's namespace, producing, reading back, roles."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from worker.config import Settings
from worker.kafka.broker import EmbeddedBroker
from worker.kafka.producer import produce_and_wait
from worker.processes import FAST_GROUP_ENV, Role
from worker.topics import create_all


def settings_for(broker: EmbeddedBroker, prefix: str, partitions: int = 4, **overrides: object) -> Settings:
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=prefix,
        consumer_group_prefix=prefix,
        topic_partitions=partitions,
        **overrides,  # type: ignore[arg-type]
    )


def role_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPIC_PREFIX": settings.topic_prefix,
        "CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "DESTINATIONS": ",".join(settings.destinations),
        **FAST_GROUP_ENV,
        **extra,
    }


def setup_topics(settings: Settings) -> None:
    create_all(settings)


def produce(settings: Settings, topic: str, items: list[tuple[str | None, bytes | None]]) -> None:
    produce_and_wait({"bootstrap.servers": settings.kafka_bootstrap_servers}, settings.topic(topic), items)


def read(
    settings: Settings,
    topic: str,
    until: Callable[[list[Message]], bool],
    timeout: float = 60.0,
) -> list[Message]:
    """Read a topic from the beginning until `until(messages)` holds or the timeout passes."""
    name = settings.topic(topic)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": "test-reader",
            "enable.auto.commit": "false",
        }
    )
    try:
        metadata = consumer.list_topics(name, timeout=10)
        consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in metadata.topics[name].partitions])
        seen: list[Message] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(seen):
            seen.extend(m for m in consumer.consume(1000, 0.2) if m.error() is None)
        return seen
    finally:
        consumer.close()


def read_count(settings: Settings, topic: str, count: int, timeout: float = 60.0) -> list[Message]:
    return read(settings, topic, lambda seen: len(seen) >= count, timeout)


def settle(settings: Settings, topic: str, timeout: float = 3.0) -> list[Message]:
    """Everything on a topic after it has been quiet for a while (to see that nothing more arrives)."""
    return read(settings, topic, lambda _seen: False, timeout)


def start_role(settings: Settings, args: list[str], log_dir: Path, **extra_env: str) -> Role:
    name = "-".join(args)
    return Role(args, role_env(settings, **extra_env), log_dir / f"{name}-{time.monotonic_ns()}.log")
