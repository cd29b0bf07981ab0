"""The one factory for the product's Kafka clients.

Every consumer, producer and admin client is built here from the user's `KAFKA_*` properties
(SASL/TLS and any other librdkafka property), so no tool connects without the security its
operator configured. It drops the properties librdkafka would warn about on the other kind of
client, it refuses consumer properties the chosen group protocol does not take, and it applies the
consumer group prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from worker.config_loader import ConfigError
from worker.kafka.producer import DeliveryCallback, Producer

# A member of one of the product's consumer groups (the roles, dlq replay).
GROUP_CONSUMER_DEFAULTS = {
    "enable.auto.commit": "true",
    "enable.auto.offset.store": "false",
    "auto.commit.interval.ms": "1000",
    "auto.offset.reset": "earliest",
    # Rebalances stall the whole group; keep the bound on one loop turn generous but finite.
    "max.poll.interval.ms": "300000",
    # Per-partition lag for /metrics comes from librdkafka's statistics.
    "statistics.interval.ms": "5000",
    # When a partition's prefetched messages reach the local queue's bound (queued.min.messages,
    # queued.max.messages.kbytes), librdkafka postpones its next fetch by this long, 1 s by
    # default: a bound that holds less than a second of a running consumer's input then starves
    # it (with the sink's BOUNDED_PREFETCH below, 10 ms took the Amplitude sink from 15,138 to
    # 20,867 events/s on Apache Kafka and from 14,269 to 22,308 on the embedded broker, medians of
    # 3 runs in docs/BENCHMARKS.md). A short wait only means the fetcher looks again sooner.
    "fetch.queue.backoff.ms": "10",
}

# For a role that refuses work and pauses its partitions (a sink whose destination is down):
# librdkafka prefetches up to 100k messages / 64 MB a consumer by default, and a paused partition's
# prefetched messages still arrive (the loop keeps them, in order), so bound that to keep its memory
# bounded. Only there: a role that never pauses (the normaliser) keeps librdkafka's prefetch. The
# bound does not starve a running sink because fetch.queue.backoff.ms (above) is short. The user's
# KAFKA_QUEUED_* and KAFKA_FETCH_QUEUE_BACKOFF_MS win.
BOUNDED_PREFETCH = {
    "queued.min.messages": "10000",
    "queued.max.messages.kbytes": "16384",
}

# A reader that assigns partitions itself and commits nothing (tail, dlq inspect, identity map).
READER_DEFAULTS = {"enable.auto.commit": "false", "enable.auto.offset.store": "false", "enable.partition.eof": "false"}

PRODUCER_DEFAULTS = {
    # Idempotence gives per-partition ordering without duplicates across internal retries,
    # which is what keeps one person's events in order.
    "enable.idempotence": "true",
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": "5",
    "batch.num.messages": "10000",
    "queue.buffering.max.messages": "200000",
    # A message not delivered in 2 minutes fails (and so does its input's commit); kept below
    # max.poll.interval.ms so a flush that waits for it cannot get the consumer thrown out of its group.
    "message.timeout.ms": "120000",
    # The Java client's (and kafkajs') partitioner: murmur2 of the key, positive, modulo the
    # partition count (random for a message without a key). librdkafka's own default
    # (consistent_random, CRC32) puts the same key on another partition, so one user written by
    # this product and by a Java or Node service would be split across partitions and lose order.
    # A user's KAFKA_PARTITIONER replaces it, like any other KAFKA_* property.
    "partitioner": "murmur2_random",
}

# Producer-only properties a user may set through KAFKA_*; librdkafka warns if a consumer sees them.
PRODUCER_ONLY = (
    "acks",
    "linger.ms",
    "compression.",
    "enable.idempotence",
    "batch.",
    "queue.buffering",
    "message.timeout.ms",
    "retries",
    "transactional.id",
    "partitioner",
)
# Consumer-only properties, likewise for producers.
CONSUMER_ONLY = (
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "auto.offset.reset",
    "group.",
    "fetch.",
    "max.poll.interval.ms",
    "enable.auto",
    "auto.commit",
    "partition.assignment",
    "isolation.",
    "queued.",
)

# Classic-protocol consumer properties that a KIP-848 group (`group.protocol=consumer`) does not
# take: its broker sets the session timeout and heartbeat interval (group.consumer.session.timeout.ms,
# group.consumer.heartbeat.interval.ms, or per group) and assigns the partitions (the client picks
# the broker's assignor with group.remote.assignor). librdkafka 2.16 refuses to create a consumer
# that sets any of these (_INVALID_ARG, one property at a time), and so does the Java client
# (ConfigException); they are refused here too, all of them in one line naming the KAFKA_*
# variables, rather than dropped with a warning: a user who set a session timeout relies on its
# failover time, and a dropped setting would silently give the broker's (45 s by default).
CLASSIC_PROTOCOL_ONLY = (
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
    "group.protocol.type",
)


def refuse_classic_only(config: Mapping[str, Any]) -> None:
    """Raise ConfigError if a `group.protocol=consumer` consumer's `config` sets a classic-only property."""
    if str(config.get("group.protocol", "classic")).strip().lower() != "consumer":
        return
    found = [name for name in CLASSIC_PROTOCOL_ONLY if name in config]
    if found:
        named = ", ".join(f"{name} (KAFKA_{name.upper().replace('.', '_')})" for name in found)
        raise ConfigError(
            f"KAFKA_GROUP_PROTOCOL=consumer (KIP-848) does not take {named}: the broker sets the group's "
            "session timeout and heartbeat interval (group.consumer.session.timeout.ms, "
            "group.consumer.heartbeat.interval.ms) and assigns its partitions (KAFKA_GROUP_REMOTE_ASSIGNOR "
            "picks the assignor); unset them, or use KAFKA_GROUP_PROTOCOL=classic"
        )


class KafkaClients:
    def __init__(self, properties: Mapping[str, str], group_prefix: str = "") -> None:
        self.properties = dict(properties)
        self.group_prefix = group_prefix

    @property
    def bootstrap_servers(self) -> str:
        return self.properties.get("bootstrap.servers", "")

    def with_properties(self, **changes: str) -> KafkaClients:
        """The same factory with some properties changed (`bootstrap_servers="..."` for `bootstrap.servers`)."""
        updated = {**self.properties, **{k.replace("_", "."): v for k, v in changes.items()}}
        return KafkaClients(updated, self.group_prefix)

    def group_id(self, role: str) -> str:
        return f"{self.group_prefix}{role}"

    # -- consumers --------------------------------------------------------------------------------

    def consumer_config(
        self, role: str, overrides: Mapping[str, Any] | None = None, *, bounded_prefetch: bool = False
    ) -> dict[str, Any]:
        """A group member's configuration: our defaults (with BOUNDED_PREFETCH for a role that
        pauses), the user's properties, then `overrides`. Raises ConfigError for a classic-only
        property under `group.protocol=consumer`."""
        config = {
            **GROUP_CONSUMER_DEFAULTS,
            **(BOUNDED_PREFETCH if bounded_prefetch else {}),
            **self._without(PRODUCER_ONLY),
            "group.id": self.group_id(role),
            **(overrides or {}),
        }
        refuse_classic_only(config)
        return config

    def consumer(self, role: str, overrides: Mapping[str, Any] | None = None) -> Consumer:
        return Consumer(self.consumer_config(role, overrides))

    def reader(self, purpose: str, overrides: Mapping[str, Any] | None = None) -> Consumer:
        """A consumer that assigns partitions itself and commits nothing; its group id is its own."""
        config = {
            **self._without(PRODUCER_ONLY),
            **READER_DEFAULTS,
            "group.id": self.group_id(f"{purpose}-{uuid.uuid4().hex[:12]}"),
            **(overrides or {}),
        }
        refuse_classic_only(config)  # librdkafka refuses them even for a consumer that never subscribes
        return Consumer(config)

    # -- producers and admin ----------------------------------------------------------------------

    def producer_config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {**PRODUCER_DEFAULTS, **self._without(CONSUMER_ONLY), **(overrides or {})}

    def producer(
        self, overrides: Mapping[str, Any] | None = None, on_failure: DeliveryCallback | None = None
    ) -> Producer:
        return Producer(self.producer_config(overrides), on_failure=on_failure)

    def admin(self) -> AdminClient:
        return AdminClient(self._without((*PRODUCER_ONLY, *CONSUMER_ONLY)))

    def _without(self, prefixes: tuple[str, ...]) -> dict[str, str]:
        return {k: v for k, v in self.properties.items() if not k.startswith(prefixes)}

    def produce_and_wait(
        self, topic: str, items: Sequence[tuple[str | bytes | None, bytes | None]], timeout: float = 30.0
    ) -> None:
        """Write (key, value) pairs and wait until every one is acknowledged; raise if any is not."""
        producer = self.producer()
        failures: list[str] = []
        for key, value in items:
            producer.produce(topic, value, key, lambda err, _m: failures.append(str(err)) if err else None)
        if producer.flush(timeout) or failures:
            raise RuntimeError(f"could not write to {topic}: {failures[:3] or 'not acknowledged in time'}")
