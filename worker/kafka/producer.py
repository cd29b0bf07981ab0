"""Producer wrapper: idempotent, lz4, acks=all, every produce with a delivery callback.

Delivery callbacks run on the thread that calls `poll`/`flush` (librdkafka's contract), which in
every role is the consumer loop's thread, so output acknowledgements need no locking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message
from confluent_kafka import Producer as _RdProducer

DeliveryCallback = Callable[[KafkaError | None, Message], None]
Headers = Sequence[tuple[str, str | bytes]]


class ProducerFatal(RuntimeError):
    """An output could not be written; the input it came from must not be committed."""


class Producer:
    """Two ways to learn about deliveries:

    - per message: pass `on_delivery` to `produce` (called for every message, success or failure);
    - by flushing: construct with `on_failure`; librdkafka then reports only failed messages
      (`delivery.report.only.error`), so a batch costs no Python call per message, and a `flush()`
      that returns 0 with no failure reported means every message before it was acknowledged.
    """

    def __init__(self, config: Mapping[str, Any], on_failure: DeliveryCallback | None = None) -> None:
        """`config` is complete (worker.kafka.clients builds it); use `KafkaClients.producer()`."""
        config = dict(config)
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
        if on_delivery is None and headers is None and partition is None:
            # The roles' per-event write: straight to librdkafka, no keyword arguments to build
            # (that cost as much as a third of the call).
            try:
                self._produce(topic, value, key)
                return
            except BufferError:
                self._producer.poll(0.05)
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
