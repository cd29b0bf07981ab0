"""`segment-worker normalize`: the normaliser's Kafka side.

For each raw message it writes every routed event to each of its destination topics, new identity
links to `segment.identities`, and rejects to `segment.dlq.raw`; the message's offset is stored
only when every one of those writes is acknowledged.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, Message

from worker import logs, metrics
from worker.config import Settings
from worker.dead_letters import Kind, dead_letter_headers
from worker.kafka.consumer_loop import Backpressure, ConsumerLoop
from worker.kafka.offsets import Ticket, TopicPartitionKey
from worker.kafka.producer import Producer, ProducerFatal
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap, IdentityTopicReader
from worker.normalize.pipeline import Normaliser, Result
from worker.normalize.user_agent import UserAgentEnricher

log = logs.get(__name__)


class _Outputs:
    """Counts one input's outstanding writes; the last acknowledgement finishes its ticket."""

    __slots__ = ("remaining", "strategy", "ticket")

    def __init__(self, ticket: Ticket, remaining: int, strategy: NormaliseStrategy) -> None:
        self.ticket = ticket
        self.remaining = remaining
        self.strategy = strategy

    def ack(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.strategy.failure = f"write to {message.topic()} failed: {error}"
            return
        self.strategy.produced[message.topic()] += 1
        self.remaining -= 1
        if self.remaining == 0:
            self.ticket.done()
            self.strategy.in_flight -= 1


class NormaliseStrategy:
    def __init__(self, settings: Settings, normaliser: Normaliser, producer: Producer) -> None:
        self.settings = settings
        self.normaliser = normaliser
        self.producer = producer
        self.max_in_flight = settings.max_in_flight
        self.in_flight = 0
        self.failure: str | None = None
        self.dest_topics = {d: settings.topic(f"dest.{d}") for d in settings.destinations}
        self.identities_topic = settings.topic("identities")
        self.dlq_topic = settings.topic("dlq.raw")
        self.produced = {t: 0 for t in (*self.dest_topics.values(), self.identities_topic, self.dlq_topic)}

    def submit(self, message: Message, ticket: Ticket) -> None:
        if self.in_flight >= self.max_in_flight:
            self.producer.poll(0.01)
            if self.in_flight >= self.max_in_flight:
                raise Backpressure
        _kind, timestamp_ms = message.timestamp()
        result = self.normaliser.process(message.value(), timestamp_ms)
        writes = sum(len(r.destinations) for r in result.routed) + len(result.links) + len(result.rejected)
        for reason in result.filtered:
            metrics.FILTERED.labels(reason).inc()
            log.debug("event filtered", reason=reason, topic=message.topic(), offset=message.offset())
        if writes == 0:
            ticket.done()
            return
        self.in_flight += 1
        self._write(message, result, _Outputs(ticket, writes, self))

    def _write(self, message: Message, result: Result, outputs: _Outputs) -> None:
        produce = self.producer.produce
        for anonymous_id, user_id in result.links:
            produce(self.identities_topic, user_id.encode(), anonymous_id, outputs.ack)
        for routed in result.routed:
            for destination in routed.destinations:
                produce(self.dest_topics[destination], routed.value, routed.key, outputs.ack)
        for rejected in result.rejected:
            extra = {} if rejected.batch_index is None else {"batch_index": str(rejected.batch_index)}
            headers = dead_letter_headers(
                error=rejected.reason,
                kind=Kind.INVALID,
                original_topic=message.topic(),
                original_partition=message.partition(),
                original_offset=message.offset(),
                destination="raw",
                extra=extra,
            )
            produce(self.dlq_topic, rejected.value, message.key(), outputs.ack, headers)
            metrics.DEAD_LETTERED.labels("raw", Kind.INVALID).inc()
            log.info(
                "dead-lettered",
                reason=rejected.reason,
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
                batch_index=rejected.batch_index,
            )

    def poll(self) -> None:
        self.producer.poll(0)
        self._flush_metrics()
        if self.failure:
            raise ProducerFatal(self.failure)

    def drain(self, timeout: float) -> None:
        remaining = self.producer.flush(timeout)
        self._flush_metrics()
        if self.failure:
            raise ProducerFatal(self.failure)
        if remaining:
            log.warning("writes still unacknowledged after drain", remaining=remaining)

    def revoke(self, partitions: list[TopicPartitionKey]) -> None:
        """Nothing to drop: drain already waited for every write of the revoked partitions."""

    def close(self) -> None:
        self.producer.flush(5)

    def _flush_metrics(self) -> None:
        for topic, count in self.produced.items():
            if count:
                metrics.PRODUCED.labels(topic).inc(count)
                self.produced[topic] = 0


def build(settings: Settings) -> tuple[ConsumerLoop, IdentityTopicReader]:
    identities = IdentityMap(settings.identity_cache_size)
    reader = IdentityTopicReader(settings.kafka_properties, settings.topic("identities"), identities)
    enrichers = [
        GeoEnricher(settings.geoip_database, settings.ip_cache_size),
        UserAgentEnricher(settings.ua_cache_size),
    ]
    normaliser = Normaliser(settings.destinations, identities, enrichers)
    strategy = NormaliseStrategy(settings, normaliser, Producer(settings.kafka_properties))
    loop = ConsumerLoop(
        settings.kafka_properties,
        settings.group("normalize"),
        [settings.topic("raw")],
        strategy,
        batch_size=settings.consume_batch_size,
    )
    return loop, reader
