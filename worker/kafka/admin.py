"""Topic administration: create every topic the pipeline uses, idempotently."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


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
    return result


def partition_counts(admin: AdminClient, timeout: float = 10.0) -> dict[str, int]:
    metadata = admin.list_topics(timeout=timeout)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}
