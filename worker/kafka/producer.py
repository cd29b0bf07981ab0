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
    # A message not delivered in 2 minutes fails (and so does its input's commit); kept below
    # max.poll.interval.ms so a flush that waits for it cannot get the consumer thrown out of its group.
    "message.timeout.ms": "120000",
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
    """Two ways to learn about deliveries:

    - per message: pass `on_delivery` to `produce` (called for every message, success or failure);
    - by flushing: construct with `on_failure`; librdkafka then reports only failed messages
      (`delivery.report.only.error`), so a batch costs no Python call per message, and a `flush()`
      that returns 0 with no failure reported means every message before it was acknowledged.
    """

    def __init__(
        self,
        properties: dict[str, str],
        overrides: dict[str, str] | None = None,
        on_failure: DeliveryCallback | None = None,
    ) -> None:
        config: dict[str, object] = {**producer_config(properties, overrides)}
        if on_failure is not None:
            config["delivery.report.only.error"] = True
            config["on_delivery"] = on_failure
        self._producer = _RdProducer(config)
        self._produce = self._producer.produce

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None,
        on_delivery: DeliveryCallback | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue one message. When librdkafka's local queue is full, serve callbacks until it has room:
        that wait is the backpressure from a slow broker."""
        kwargs: dict[str, object] = {}
        if on_delivery is not None:
            kwargs["on_delivery"] = on_delivery
        if headers is not None:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._produce(topic, value, key, **kwargs)
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


def produce_and_wait(
    properties: dict[str, str], topic: str, items: Sequence[tuple[str | None, bytes | None]], timeout: float = 30.0
) -> None:
    """Write (key, value) pairs and wait until every one is acknowledged; raise if any is not."""
    producer = Producer(properties)
    failures: list[str] = []
    for key, value in items:
        producer.produce(topic, value, key, lambda err, _m: failures.append(str(err)) if err else None)
    if producer.flush(timeout) or failures:
        raise RuntimeError(f"could not write to {topic}: {failures[:3] or 'not acknowledged in time'}")
