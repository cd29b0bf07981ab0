"""Topic administration: create every topic the pipeline uses, idempotently."""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from worker import logs
from worker.config_loader import ConfigError

log = logs.get(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def create_topics(
    admin: AdminClient, specs: list[TopicSpec], replication_factor: int = 1, timeout: float = 15.0
) -> dict[str, str]:
    """Create the topics that do not exist yet. Returns name -> "created" | "exists"; raises on other errors.

    Existing topics are left alone (their partition count is not changed: adding partitions would
    move keys, and so people's events, to other partitions).
    """
    new = [NewTopic(s.name, s.partitions, replication_factor, config=s.config) for s in specs]
    result: dict[str, str] = {}
    for name, future in admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            future.result(timeout)
            result[name] = "created"
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            result[name] = "exists"
    _wait_until_listed(admin, [s.name for s in specs], timeout)
    return result


def _wait_until_listed(admin: AdminClient, names: list[str], timeout: float) -> None:
    """A created topic takes a moment to reach every broker's metadata (Apache Kafka answers
    UNKNOWN_TOPIC_OR_PART meanwhile): return only once each is listed with its partitions."""
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        missing = [n for n in names if n not in topics or topics[n].error is not None or not topics[n].partitions]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise KafkaException(f"topics not listed {timeout}s after creation: {missing[:5]}")
        time.sleep(0.05)


def partition_counts(admin: AdminClient, timeout: float = 10.0) -> dict[str, int]:
    metadata = admin.list_topics(timeout=timeout)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def require_topics(admin: AdminClient, names: list[str], timeout: float = 10.0) -> None:
    """Refuse to start a role whose topics do not exist (ConfigError naming them and the fix), so a
    missing dead-letter topic is one clear line at deploy time, not a crash at the first poison event,
    again after every restart. A broker that cannot be reached within `timeout` is not a reason to
    refuse: the role starts and librdkafka keeps trying, as it would later on."""
    try:
        topics = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        log.warning("could not check the topics exist; starting anyway", error=str(exc))
        return
    missing = [n for n in names if n not in topics or topics[n].error is not None]
    if missing:
        raise ConfigError(
            f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            "not on the broker: run `segment-worker topics create` (with the same TOPIC_PREFIX)"
        )
