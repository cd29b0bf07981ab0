"""The pipeline's topics and how they are created."""

from __future__ import annotations

from worker.config import ALL_DESTINATIONS, Settings
from worker.kafka.admin import TopicSpec, create_topics


def topic_specs(settings: Settings) -> list[TopicSpec]:
    n = settings.topic_partitions
    specs = [
        TopicSpec(settings.topic("raw"), n, {}),
        # Compacted: only the latest userId per anonymousId matters, and every normaliser re-reads it all.
        TopicSpec(settings.topic("identities"), n, {"cleanup.policy": "compact"}),
        TopicSpec(settings.topic("dlq.raw"), n, {}),
    ]
    for destination in ALL_DESTINATIONS:
        specs.append(TopicSpec(settings.topic(f"dest.{destination}"), n, {}))
        specs.append(TopicSpec(settings.topic(f"dlq.{destination}"), n, {}))
    return specs


def create_all(settings: Settings) -> dict[str, str]:
    return create_topics(settings.kafka_properties, topic_specs(settings), settings.topic_replication_factor)
