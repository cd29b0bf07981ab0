"""The pipeline's topics and how they are created."""

from __future__ import annotations

from worker.config import Config
from worker.destinations import registry
from worker.kafka.admin import TopicSpec, create_topics
from worker.names import RAW


def topic_specs(config: Config) -> list[TopicSpec]:
    n, names = config.settings.topic_partitions, config.names
    specs = [
        TopicSpec(names.raw, n, {}),
        # Compacted: only the latest userId per anonymousId matters, and every normaliser re-reads it all.
        TopicSpec(names.identities, n, {"cleanup.policy": "compact"}),
        TopicSpec(names.dlq(RAW), n, {}),
    ]
    for destination in registry.names():
        specs.append(TopicSpec(names.dest(destination), n, {}))
        specs.append(TopicSpec(names.dlq(destination), n, {}))
    return specs


def create_all(config: Config) -> dict[str, str]:
    return create_topics(config.kafka.admin(), topic_specs(config), config.settings.topic_replication_factor)
