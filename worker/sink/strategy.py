"""`segment-worker sink DEST`: a destination's consumer group.

The Kafka side of the shared sink runner. For each consumed batch it decodes the Avro records,
maps each event to the destination's items (a pure function of the destination module) and hands
them to the delivery engine. The engine's reports arrive on one queue; the tracker
(worker.sink.tracker) says when a message is settled, failed messages are dead-lettered through
the one writer (worker.dlq.writer), and a batch is done, so its offsets may be stored, only after a
2xx or an acknowledged dead letter. While too many items are outstanding (a slow or down
destination) it refuses batches, and the loop pauses its partitions.

One bad event never stops the sink: whatever decoding or the destination's `map_event` raises for
it (not only Skip and Unmappable) dead-letters that event `invalid`, with the exception as the
reason, and the batch goes on.

Items the engine holds back behind a held user (a retry's backoff, a throttle) are outstanding but
do not count towards the buffer that pauses every partition (the engine's `HoldReport` says how
many, bounded per user and in all by SINK_MAX_HELD_PER_USER and SINK_MAX_HELD_EVENTS), so one slow
heavy user does not stall the others, and memory stays bounded by SINK_MAX_BUFFERED_EVENTS +
SINK_MAX_HELD_EVENTS items plus one consumed batch.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from confluent_kafka import KafkaError, Message

from worker import logs, metrics
from worker.avro_codec import EventCodec, UnknownSchema
from worker.config import Config
from worker.destinations.base import Destination, Item, Skip, Unmappable
from worker.dlq.headers import Kind
from worker.dlq.settings import DlqSettings
from worker.dlq.writer import DeadLetterWriter
from worker.health import HEALTH
from worker.kafka.admin import require_topics
from worker.kafka.clients import KafkaClients
from worker.kafka.consumer_loop import Backpressure, ConsumerLoop
from worker.kafka.offsets import Batch, TopicPartitionKey
from worker.kafka.producer import ProducerFatal
from worker.names import Names, sink_role
from worker.sink.delivery import DeliveryEngine, Pending
from worker.sink.reports import DELIVERED, CircuitReport, DeliveredReport, Failed, HoldReport, ItemReport, Report
from worker.sink.settings import SinkSettings
from worker.sink.tracker import OpenMessage, SinkTracker

log = logs.get(__name__)


class SinkStrategy:
    def __init__(
        self,
        clients: KafkaClients,
        names: Names,
        sink: SinkSettings,
        destination: Destination,
        dlq: DlqSettings | None = None,
    ) -> None:
        self.destination = destination
        self.name = destination.name
        self.max_buffered = buffer_limit(sink, destination)
        self.codec = EventCodec()
        self.producer = clients.producer()
        self.dead_letters = DeadLetterWriter(self.producer, names.dlq(self.name), self.name, dlq)
        self.tracker = SinkTracker()
        self.reports: queue.SimpleQueue[Report] = queue.SimpleQueue()
        self.engine = DeliveryEngine(destination, sink, self.reports.put)
        self.engine.start()
        self.outstanding = 0  # items handed to the engine and not yet reported ...
        self.held = 0  # ... of which this many are held for throttled users (outside the shared buffer)
        self.dead_letters_in_flight = 0
        self.failure: str | None = None

    # -- intake -----------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Outstanding items that count towards SINK_MAX_BUFFERED_EVENTS: all but the held ones."""
        return self.outstanding - self.held

    def submit(self, batch: Batch) -> None:
        if self.buffered >= self.max_buffered:
            self.poll()
            if self.buffered >= self.max_buffered:
                raise Backpressure
        work: list[Pending] = []
        for entry in self.tracker.open(batch):
            message = entry.message
            try:
                items = self._map(message)
            except Skip as skip:
                metrics.FILTERED.labels(f"{self.name}: {skip.reason}").inc()
                log.debug("event filtered", destination=self.name, reason=skip.reason, offset=message.offset())
                self.tracker.expect(entry, 0)
                self._finish(entry)
                continue
            except Unmappable as unmappable:
                self.tracker.fail(entry, Failed(Kind.INVALID, unmappable.reason, 0))
                self._finish(entry)
                continue
            except Exception as exc:  # a mapping bug, or input it did not foresee: this event alone fails
                reason = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "event could not be mapped", destination=self.name, reason=reason[:300], offset=message.offset()
                )
                self.tracker.fail(entry, Failed(Kind.INVALID, reason, 0))
                self._finish(entry)
                continue
            # An item's size for the request byte limit: the whole event's record length, an upper
            # bound in practice (a payload maps a subset of the event) that costs nothing to get. A
            # request that still comes out too large gets 413 and is halved.
            size = len(message.value() or b"")
            work.extend(Pending(item, entry, size) for item in items)
            if self.tracker.expect(entry, len(items)):
                self._finish(entry)
        self.outstanding += len(work)
        metrics.OUTSTANDING.set(self.outstanding)
        self.engine.submit(work)

    def _map(self, message: Message) -> list[Any]:
        value = message.value()
        if value is None:
            raise Unmappable("empty message")
        try:
            event, _extra = self.codec.decode(value)
        except (UnknownSchema, ValueError, IndexError, UnicodeDecodeError) as exc:
            raise Unmappable(f"cannot decode the record: {exc}") from None
        items = self.destination.map_event(event)
        endpoints = self.destination.endpoints
        # A plain loop, not all(<generator>): this runs for every event.
        if items.__class__ is not list:
            raise TypeError(f"{self.name}.map_event returned {str(items)[:200]}, not a list of Items")
        for item in items:
            if item.__class__ is not Item or item.endpoint not in endpoints:
                raise TypeError(f"{self.name}.map_event returned {str(items)[:200]}, not Items for its endpoints")
        return items

    # -- reports from the engine ----------------------------------------------------------------

    def poll(self) -> None:
        self.producer.poll(0)
        if self.failure:
            raise ProducerFatal(self.failure)
        reports = self.reports
        while True:
            try:
                report = reports.get_nowait()
            except queue.Empty:
                break
            if isinstance(report, DeliveredReport):  # the common case: a request's delivered items
                tracker = self.tracker
                owners = report.owners
                self.outstanding -= len(owners)
                for entry in owners:
                    if tracker.report(entry, DELIVERED):
                        self._finish(entry)
                continue
            if isinstance(report, CircuitReport):
                self._on_circuit(report)
                continue
            if isinstance(report, HoldReport):
                self.held = report.held
                continue
            assert isinstance(report, ItemReport)
            self.outstanding -= 1
            if self.tracker.report(report.owner, report.outcome):
                self._finish(report.owner)
        metrics.OUTSTANDING.set(self.outstanding)

    def _on_circuit(self, report: CircuitReport) -> None:
        failing = f"{self.name} failing: {report.consecutive_failures} requests in a row"
        HEALTH.set_blocked(failing if report.open else None)
        log.warning("destination circuit open" if report.open else "destination circuit closed", destination=self.name)

    def _finish(self, entry: OpenMessage) -> None:
        """All of a message's items are reported: dead-letter it if any failed, then complete it."""
        failure = entry.failure
        if failure is None:
            self.dead_letters.note_success()
            self.tracker.complete(entry)
            return
        self.dead_letters_in_flight += 1

        def acknowledged(error: KafkaError | None, _record: Message) -> None:
            self.dead_letters_in_flight -= 1
            if error is not None:
                self.failure = f"dead letter to {self.dead_letters.topic} failed: {error}"
                return
            self.tracker.complete(entry)

        self.dead_letters.write(
            entry.message,
            failure.kind,
            failure.reason,
            attempts=failure.attempts,
            http_status=failure.http_status,
            on_delivery=acknowledged,
        )

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
        """Withdraw the revoked partitions' unfinished messages: their new owner redoes them. The
        engine waits (at most the request timeout) for requests under way that carry them, and never
        retries them, so nothing of theirs lands after the new owner starts."""
        gone = set(partitions)
        self.engine.withdraw(lambda entry: entry.key in gone)
        self.tracker.withdraw(partitions)

    def close(self) -> None:
        self.engine.stop()
        self.producer.flush(10)


def drain_timeout(sink: SinkSettings) -> float:
    """How long a rebalance waits for the sink's outstanding work: a down destination must not
    stall the whole group for long."""
    return min(10.0, sink.request_timeout * 2)


def buffer_limit(sink: SinkSettings, destination: Destination) -> int:
    """SINK_MAX_BUFFERED_EVENTS, but no more than a rate-limited destination takes within a
    rebalance's drain: items beyond that would be delivered after the drain gave up, stay
    uncommitted (a partition commits up to its oldest unfinished message), and be sent again by
    the partition's next owner; Brevo, with no event id, would store them twice."""
    limit = sink.max_buffered_events
    if destination.events_per_second:
        limit = min(limit, max(1, int(destination.events_per_second * drain_timeout(sink))))
    return limit


def build(config: Config, destination_name: str) -> ConsumerLoop:
    """The sink for `destination_name`, configured from `config`; raises ConfigError on bad settings."""
    sink = config.sink()
    destination = config.destination(destination_name)
    require_topics(config.kafka.admin(), [config.names.dest(destination_name), config.names.dlq(destination_name)])
    strategy = SinkStrategy(config.kafka, config.names, sink, destination, config.dlq())
    return ConsumerLoop(
        config.kafka,
        sink_role(destination_name),
        [config.names.dest(destination_name)],
        strategy,
        batch_size=config.settings.consume_batch_size,
        drain_timeout=drain_timeout(sink),
        bounded_prefetch=True,  # it pauses while its destination is down: its memory stays bounded
    )
