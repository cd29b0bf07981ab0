"""The pipeline's topics and how they are created."""

from __future__ import annotations

from worker.config import Config
from worker.destinations import registry
from worker.kafka.admin import TopicSpec, create_topics
from worker.names import RAW


def durability(replication_factor: int) -> dict[str, str]:
    """With acks=all, a write is acknowledged once `min.insync.replicas` copies have it: two of three
    (one broker may fail without losing an acknowledged write or stopping writes); set on each topic
    so a broker left at Kafka's default of 1 does not quietly weaken it."""
    return {"min.insync.replicas": str(min(2, replication_factor - 1))} if replication_factor > 1 else {}


def topic_specs(config: Config) -> list[TopicSpec]:
    n, names = config.settings.topic_partitions, config.names
    base = durability(config.settings.topic_replication_factor)
    specs = [
        TopicSpec(names.raw, n, base),
        # Compacted: only the latest userId per anonymousId matters, and every normaliser re-reads it all.
        TopicSpec(names.identities, n, {**base, "cleanup.policy": "compact"}),
        TopicSpec(names.dlq(RAW), n, base),
    ]
    for destination in registry.names():
        specs.append(TopicSpec(names.dest(destination), n, base))
        specs.append(TopicSpec(names.dlq(destination), n, base))
    return specs


def create_all(config: Config) -> dict[str, str]:
    return create_topics(config.kafka.admin(), topic_specs(config), config.settings.topic_replication_factor)
