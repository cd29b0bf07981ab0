"""`segment-worker sink DEST`: a destination's consumer group.

The Kafka side of the shared sink runner. For each consumed batch it decodes the Avro records,
maps each event to the destination's items (a pure function of the destination module) and hands
them to the delivery engine; as the engine reports items delivered or failed, it dead-letters
failed messages (original bytes and key, headers from DESIGN.md) and marks batches done, so an
offset is stored only after a 2xx or an acknowledged dead letter. While too many items are
outstanding (a slow or down destination) it refuses batches, and the loop pauses its partitions.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from confluent_kafka import KafkaError, Message

from worker import logs, metrics
from worker.avro_codec import EventCodec, UnknownSchema
from worker.config import Settings
from worker.dead_letters import Kind, dead_letter_headers
from worker.destinations.base import Destination, InvalidEvent, Skip
from worker.destinations.registry import make_destination
from worker.health import HEALTH
from worker.kafka.consumer_loop import Backpressure, ConsumerLoop
from worker.kafka.offsets import Batch, TopicPartitionKey
from worker.kafka.producer import Producer, ProducerFatal
from worker.sink.delivery import DROPPED, DeliveryEngine, Pending
from worker.sink.settings import SinkSettings

log = logs.get(__name__)


class _BatchState:
    __slots__ = ("batch", "remaining")

    def __init__(self, batch: Batch, remaining: int) -> None:
        self.batch = batch
        self.remaining = remaining


class _MessageState:
    """One consumed message: how many of its items are unfinished, and the first failure among them."""

    __slots__ = ("batch_state", "failure", "finished", "key", "message", "remaining")

    def __init__(self, batch_state: _BatchState, message: Message) -> None:
        self.batch_state = batch_state
        self.message = message
        self.key: TopicPartitionKey = (message.topic(), message.partition())
        self.remaining = 0
        self.failure: tuple[Kind, str, int, int | None] | None = None  # kind, reason, attempts, http status
        self.finished = False


class SinkStrategy:
    def __init__(self, settings: Settings, sink: SinkSettings, destination: Destination) -> None:
        self.destination = destination
        self.name = destination.name
        self.max_buffered = sink.max_buffered_events
        self.dlq_topic = settings.topic(f"dlq.{self.name}")
        self.codec = EventCodec()
        self.producer = Producer(settings.kafka_properties)
        self.reports: queue.SimpleQueue[tuple[Pending, Any, str]] = queue.SimpleQueue()
        self.engine = DeliveryEngine(destination, sink, lambda p, kind, reason: self.reports.put((p, kind, reason)))
        self.engine.start()
        self.outstanding = 0  # items handed to the engine and not yet reported
        self.dead_letters_in_flight = 0
        self.failure: str | None = None
        self._open: dict[TopicPartitionKey, set[_MessageState]] = {}

    # -- intake -----------------------------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        if self.outstanding >= self.max_buffered:
            self.poll()
            if self.outstanding >= self.max_buffered:
                raise Backpressure
        state = _BatchState(batch, len(batch.messages))
        work: list[Pending] = []
        for message in batch.messages:
            owner = _MessageState(state, message)
            self._open.setdefault(owner.key, set()).add(owner)
            try:
                items = self._map(message)
            except Skip as skip:
                metrics.FILTERED.labels(f"{self.name}: {skip.reason}").inc()
                log.debug("event filtered", destination=self.name, reason=skip.reason, offset=message.offset())
                self._finish(owner)
                continue
            except InvalidEvent as invalid:
                owner.failure = (Kind.INVALID, invalid.reason, 0, None)
                self._finish(owner)
                continue
            owner.remaining = len(items)
            # An item's size for the request byte limit: the whole event's record length, an upper
            # bound in practice (a payload maps a subset of the event) that costs nothing to get. A
            # request that still comes out too large gets 413 and is halved.
            size = len(message.value() or b"")
            for item in items:
                work.append(Pending(item, owner, size))
            if not items:
                self._finish(owner)
        self.outstanding += len(work)
        metrics.OUTSTANDING.set(self.outstanding)
        self.engine.submit(work)

    def _map(self, message: Message) -> list[Any]:
        value = message.value()
        if value is None:
            raise InvalidEvent("empty message")
        try:
            event, _extra = self.codec.decode(value)
        except (UnknownSchema, ValueError, IndexError, UnicodeDecodeError) as exc:
            raise InvalidEvent(f"cannot decode the record: {exc}") from None
        return self.destination.map_event(event)

    # -- reports from the engine ----------------------------------------------------------------

    def poll(self) -> None:
        self.producer.poll(0)
        if self.failure:
            raise ProducerFatal(self.failure)
        reports = self.reports
        while True:
            try:
                pending, kind, reason = reports.get_nowait()
            except queue.Empty:
                break
            self.outstanding -= 1
            owner: _MessageState = pending.owner
            if owner.finished or kind == DROPPED:
                continue
            if kind is not None and owner.failure is None:
                owner.failure = (kind, reason, pending.attempts, pending.http_status)
            owner.remaining -= 1
            if owner.remaining == 0:
                self._finish(owner)
        metrics.OUTSTANDING.set(self.outstanding)
        failures = self.engine.consecutive_failures
        HEALTH.set_blocked(f"{self.name} failing: {failures} requests in a row" if self.engine.circuit_open else None)

    def _finish(self, owner: _MessageState) -> None:
        """All of a message's items are done: dead-letter it if any failed, then count it."""
        if owner.failure is None:
            self._complete(owner)
            return
        kind, reason, attempts, http_status = owner.failure
        message = owner.message
        headers = dead_letter_headers(
            error=reason,
            kind=kind,
            original_topic=message.topic(),
            original_partition=message.partition(),
            original_offset=message.offset(),
            destination=self.name,
            attempts=max(attempts, 1),
            http_status=http_status,
        )
        self.dead_letters_in_flight += 1

        def acknowledged(error: KafkaError | None, _record: Message) -> None:
            self.dead_letters_in_flight -= 1
            if error is not None:
                self.failure = f"dead letter to {self.dlq_topic} failed: {error}"
                return
            metrics.DEAD_LETTERED.labels(self.name, str(kind)).inc()
            self._complete(owner)

        self.producer.produce(self.dlq_topic, message.value(), message.key(), acknowledged, headers)
        log.info(
            "dead-lettered",
            destination=self.name,
            kind=str(kind),
            reason=reason,
            http_status=http_status,
            partition=message.partition(),
            offset=message.offset(),
            attempts=attempts,
        )

    def _complete(self, owner: _MessageState) -> None:
        if owner.finished:
            return
        owner.finished = True
        self._open.get(owner.key, set()).discard(owner)
        state = owner.batch_state
        state.remaining -= 1
        if state.remaining == 0:
            state.batch.done()

    # -- lifecycle ------------------------------------------------------------------------------

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.outstanding or self.dead_letters_in_flight) and time.monotonic() < deadline:
            HEALTH.beat()
            self.poll()
            self.producer.poll(0.05)
        if self.outstanding or self.dead_letters_in_flight:
            log.warning(
                "drain timed out; unfinished messages stay uncommitted",
                destination=self.name,
                outstanding=self.outstanding,
            )

    def revoke(self, partitions: list[TopicPartitionKey]) -> None:
        """Withdraw the revoked partitions' unfinished messages: their new owner redoes them."""
        gone = set(partitions)
        self.engine.drop(lambda owner: owner.key in gone)
        for key in partitions:
            for owner in self._open.pop(key, set()):
                owner.failure = None
                self._complete(owner)  # lets its batch finish for the partitions we keep

    def close(self) -> None:
        self.engine.stop()
        self.producer.flush(10)


def build(settings: Settings, destination_name: str, sink: SinkSettings | None = None) -> ConsumerLoop:
    sink = sink or SinkSettings()
    destination = make_destination(destination_name)
    strategy = SinkStrategy(settings, sink, destination)
    return ConsumerLoop(
        settings.kafka_properties,
        settings.group(f"sink-{destination_name}"),
        [settings.topic(f"dest.{destination_name}")],
        strategy,
        batch_size=settings.consume_batch_size,
        # A rebalance waits for this; a down destination must not stall the whole group for long.
        drain_timeout=min(10.0, sink.request_timeout * 2),
    )
