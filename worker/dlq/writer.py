"""The one dead-letter writer: the normaliser and every sink write dead letters through it.

A dead letter keeps the original value and key; its headers say what failed, why and where it came
from (worker.dlq.headers). Writing one also counts it (`segment_worker_dead_lettered_total`) and
logs one line; the caller learns of the broker's acknowledgement through `on_delivery`.
"""

from __future__ import annotations

from confluent_kafka import Message

from worker import logs, metrics
from worker.dlq.headers import Kind, dead_letter_headers
from worker.kafka.producer import DeliveryCallback, Producer

log = logs.get(__name__)


class DeadLetterWriter:
    def __init__(self, producer: Producer, topic: str, destination: str) -> None:
        self.producer = producer
        self.topic = topic
        self.destination = destination  # a destination's name, or "raw" for the normaliser's rejects
        self._counters = {kind: metrics.DEAD_LETTERED.labels(destination, str(kind)) for kind in Kind}

    def write(
        self,
        original: Message,
        kind: Kind,
        reason: str,
        *,
        value: bytes | None = None,
        attempts: int = 1,
        http_status: int | None = None,
        extra: dict[str, str] | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Queue the dead letter of `original` (or of `value`, one part of it, e.g. a batch's event)."""
        headers = dead_letter_headers(
            error=reason,
            kind=kind,
            original_topic=original.topic(),
            original_partition=original.partition(),
            original_offset=original.offset(),
            destination=self.destination,
            attempts=max(attempts, 1),
            http_status=http_status,
            extra=extra,
        )
        payload = original.value() if value is None else value
        self.producer.produce(self.topic, payload, original.key(), on_delivery, headers)
        self._counters[kind].inc()
        log.info(
            "dead-lettered",
            destination=self.destination,
            kind=str(kind),
            reason=reason,
            http_status=http_status,
            topic=original.topic(),
            partition=original.partition(),
            offset=original.offset(),
            attempts=attempts,
            **(extra or {}),
        )
