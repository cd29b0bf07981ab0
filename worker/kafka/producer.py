"""Producer wrapper: idempotent, lz4, acks=all, every produce with a delivery callback.

Delivery callbacks run on the thread that calls `poll`/`flush` (librdkafka's contract), which in
every role is the consumer loop's thread, so output acknowledgements need no locking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, Message
from confluent_kafka import Producer as _RdProducer

DeliveryCallback = Callable[[KafkaError | None, Message], None]
Headers = Sequence[tuple[str, str | bytes]]

PRODUCER_DEFAULTS = {
    # Idempotence gives per-partition ordering without duplicates across internal retries,
    # which is what keeps one person's events in order.
    "enable.idempotence": "true",
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": "5",
    "batch.num.messages": "10000",
    "queue.buffering.max.messages": "200000",
}

# Consumer-only properties a user may set through KAFKA_*; librdkafka warns if a producer sees them.
_CONSUMER_ONLY = (
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
)


def producer_config(properties: dict[str, str], overrides: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in properties.items() if not k.startswith(_CONSUMER_ONLY)}
    return {**PRODUCER_DEFAULTS, **base, **(overrides or {})}


class ProducerFatal(RuntimeError):
    """An output could not be written; the input it came from must not be committed."""


class Producer:
    def __init__(self, properties: dict[str, str], overrides: dict[str, str] | None = None) -> None:
        self._producer = _RdProducer(producer_config(properties, overrides))

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None,
        on_delivery: DeliveryCallback,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue one message. When librdkafka's local queue is full, serve callbacks until it has room:
        that wait is the backpressure from a slow broker."""
        kwargs = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=on_delivery, headers=headers, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)

    def poll(self, timeout: float = 0.0) -> int:
        return self._producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait for every queued message's delivery callback; returns how many are still outstanding."""
        return self._producer.flush(timeout)

    def __len__(self) -> int:
        return len(self._producer)
