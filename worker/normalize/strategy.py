"""`segment-worker normalize`: the normaliser's Kafka side.

For each raw message it writes every routed event to each of its destination topics, new identity
links to `segment.identities`, and rejects to `segment.dlq.raw`; the message's offset is stored
only when every one of those writes is acknowledged. An anonymous event that a destination cannot
use without a userId may wait a short time for its link (worker.normalize.stitching); its batch
stays open, uncommitted, until the event has been written.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message

from worker import logs, metrics
from worker.config import Config
from worker.destinations import registry
from worker.dlq.headers import Kind
from worker.dlq.settings import DlqSettings
from worker.dlq.writer import DeadLetterWriter
from worker.health import HEALTH
from worker.kafka.admin import require_topics
from worker.kafka.clients import KafkaClients
from worker.kafka.consumer_loop import ConsumerLoop
from worker.kafka.offsets import Batch, TopicPartitionKey
from worker.kafka.producer import ProducerFatal
from worker.names import NORMALIZE_ROLE, RAW, Names
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap, IdentityTopicReader
from worker.normalize.metrics import STITCH_WAITING, STITCHED, UNSTITCHED
from worker.normalize.pipeline import Normaliser, Result, RoutedEvent
from worker.normalize.stitching import USER_ID_TYPES, WaitLine
from worker.normalize.user_agent import UserAgentEnricher

log = logs.get(__name__)


class _Open:
    """A batch until all its outputs are acknowledged: one share for its own writes (settled after
    the flush that ends `submit`), one for each copy of its events waiting in the line."""

    __slots__ = ("batch", "pending")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.pending = 1

    def settle(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.batch.done()


@dataclass(slots=True)
class _Held:
    """The copies of one event for the destinations that need a userId, waiting in the line."""

    routed: RoutedEvent
    destinations: list[str]
    own_wait: bool  # it needs a userId itself (else it only keeps its place behind one that does)
    batch: _Open
    partition: TopicPartitionKey


def _let_go_of_event(routed: RoutedEvent) -> None:
    """Keep of a routed event only what writing it needs: its encoded value and the ids the
    stitching checks read. Only an event that may wait in the line for its userId is encoded again
    (`_release`), so only that one keeps its parsed event and `extra`.

    Why: a batch's results wait, while the next messages are processed, for the previous batch's
    acknowledgement. A thousand parsed events (some sixty objects each) held that long are freed
    long after they left the CPU's caches; in-process that made the normaliser's work 42-44 us an
    event instead of 29-33 us (measured on realistic traffic, 1,000-event batches).
    """
    event = routed.event
    slim: dict[str, str] = {"type": event["type"], "anonymousId": event["anonymousId"]}
    if "userId" in event:
        slim["userId"] = event["userId"]
    routed.event = slim  # type: ignore[assignment]
    routed.extra = {}


class NormaliseStrategy:
    """Process a batch, write its outputs, and mark it done once they are all acknowledged.

    The producer reports only failures, so a moment when librdkafka's queue is empty with no
    failure reported proves every write so far was acknowledged, without a Python callback per
    message (about a tenth of the per-event cost). That moment is looked for after the next batch
    was processed (`submit`), on every loop turn (`poll`), and waited for in `drain`.
    """

    def __init__(
        self,
        clients: KafkaClients,
        names: Names,
        destinations: list[str],
        normaliser: Normaliser,
        dlq: DlqSettings | None = None,
        stitch_wait_ms: int = 0,
        line: WaitLine[_Held] | None = None,
    ) -> None:
        """`stitch_wait_ms` > 0 holds anonymous events for their link (or pass a `line` of your own)."""
        self.normaliser = normaliser
        self.failure: str | None = None
        self.producer = clients.producer(on_failure=self._on_failure)
        self.dest_topics = {d: names.dest(d) for d in destinations}
        self.identities_topic = names.identities
        self.dead_letters = DeadLetterWriter(self.producer, names.dlq(RAW), RAW, dlq)
        topics = (*self.dest_topics.values(), self.identities_topic, self.dead_letters.topic)
        self._produced = {t: metrics.PRODUCED.labels(t) for t in topics}
        self._counts = dict.fromkeys(topics, 0)
        self.identities = normaliser.identities
        self._needs = frozenset(e.name for e in registry.entries() if e.needs_user_id) & frozenset(destinations)
        self._unstitched = {d: UNSTITCHED.labels(d) for d in self._needs}
        if line is None and stitch_wait_ms > 0 and self._needs:
            line = WaitLine(stitch_wait_ms)
        self.line = line
        # The line's per-anonymousId queues, read per event; an empty dict stands in when there is
        # no line, so the hot path is the same `not waiting` test either way.
        self._waiting: Mapping[str, object] = line.by_id if line is not None else {}
        self._links: deque[str] = self.identities.watch() if line is not None else deque()
        self._unconfirmed: list[_Open] = []  # batches of held copies written, not yet known acknowledged

    def _on_failure(self, error: KafkaError | None, message: Message) -> None:
        self.failure = f"write to {message.topic()} failed: {error}"

    def submit(self, batch: Batch) -> None:
        """Process the batch while the previous one's writes are on their way, then make sure those
        are acknowledged (settling that batch), then write this one's, which the next `submit`,
        `poll` or `drain` confirms. So the broker's round trip overlaps the CPU work instead of
        following it, and a batch is still done only once all its writes are acknowledged."""
        process = self.normaliser.process
        keeps_events = self.line is not None
        results = []
        for message in batch.messages:
            _kind, timestamp_ms = message.timestamp()
            result = process(message.value(), timestamp_ms, message.topic(), message.partition(), message.offset())
            for routed in result.routed:
                if not keeps_events or "userId" in routed.event:
                    _let_go_of_event(routed)
            results.append(result)
        if self._unconfirmed:
            self._flush()  # usually there is nothing left to wait for by now
            self._confirm()
        if self.line is not None:
            self._service_line()  # links and deadlines since the last turn go before newer events
        open_batch = _Open(batch)
        for message, result in zip(batch.messages, results, strict=True):
            self._write(message, result, open_batch)
        self._unconfirmed.append(open_batch)  # its own share, settled once its writes are confirmed
        self.producer.poll(0)
        if self.line is not None:
            STITCH_WAITING.set(len(self.line))

    def _confirm(self) -> None:
        """Everything written so far is acknowledged: settle the batches of held copies written
        since the last time, and count what was produced."""
        unconfirmed, self._unconfirmed = self._unconfirmed, []
        for open_batch in unconfirmed:
            open_batch.settle()
        for topic, count in self._counts.items():
            if count:
                self._produced[topic].inc(count)
                self._counts[topic] = 0

    def _flush(self) -> None:
        while self.producer.flush(1.0):
            HEALTH.beat()  # a slow broker is not a stalled worker; message.timeout.ms bounds this wait
            if self.failure:
                break
        if self.failure:
            raise ProducerFatal(self.failure)

    def _write(self, message: Message, result: Result, open_batch: _Open) -> None:
        produce = self.producer.produce
        counts = self._counts
        waiting = self._waiting
        for anonymous_id, user_id in result.links:
            produce(self.identities_topic, user_id.encode(), anonymous_id)
            counts[self.identities_topic] += 1
        for routed in result.routed:
            event = routed.event
            # The common case, a known person whose ids have nothing waiting, costs a lookup or two.
            if "userId" not in event or (
                waiting and (event["anonymousId"] in waiting or (routed.link is not None and routed.link[0] in waiting))
            ):
                self._route(routed, (message.topic(), message.partition()), open_batch)
                continue
            for destination in routed.destinations:
                topic = self.dest_topics[destination]
                produce(topic, routed.value, routed.key)
                counts[topic] += 1
        for reason in result.filtered:
            metrics.FILTERED.labels(reason).inc()
            log.debug("event filtered", reason=reason, topic=message.topic(), offset=message.offset())
        if result.routed or result.filtered:
            self.dead_letters.note_success()
        for rejected in result.rejected:
            extra = None if rejected.index is None else {"batch_index": str(rejected.index)}
            self.dead_letters.write(message, Kind.INVALID, rejected.reason, value=rejected.value, extra=extra)
            counts[self.dead_letters.topic] += 1

    # -- identity stitching -----------------------------------------------------------------------

    def _route(self, routed: RoutedEvent, partition: TopicPartitionKey, open_batch: _Open) -> None:
        """An anonymous event, or any event while someone waits: write it, or hold the copies that
        need a userId, keeping each anonymousId's order (docs/ARCHITECTURE.md#identity-stitching)."""
        event = routed.event
        line = self.line
        waiting = self._waiting  # empty when there is no line
        link = routed.link
        if line is not None and link is not None and link[0] in waiting:
            # This event links a waiting anonymousId (an identify, an alias): those go first, with it.
            self._release(line.release(link[0]), link[1])
        anonymous_id = event["anonymousId"]
        if "userId" in event:
            # Known through the map (filled by the normaliser): anything still held goes first.
            if line is not None and anonymous_id in waiting and (known := self.identities.get(anonymous_id)):
                self._release(line.release(anonymous_id), known)
            self._emit(routed, routed.destinations)
            return
        needing = [d for d in routed.destinations if d in self._needs]
        own_wait = event["type"] in USER_ID_TYPES
        if not needing or not (own_wait or anonymous_id in waiting):
            self._emit(routed, routed.destinations)
            return
        if line is None:
            self._emit(routed, routed.destinations)
            for destination in needing:
                self._unstitched[destination].inc()
            return
        others = [d for d in routed.destinations if d not in self._needs]
        if others:  # destinations that take anonymous events get them now, as they are
            self._emit(routed, others)
        held = _Held(routed, needing, own_wait, open_batch, partition)
        open_batch.pending += 1
        if anonymous_id not in waiting and (known := self.identities.get(anonymous_id)) is not None:
            # Linked since the normaliser looked: by a later event of the same payload, or just now
            # by the identities reader.
            self._release([held], known)
            return
        for evicted_id, items in line.hold(anonymous_id, held, own_wait=own_wait):
            self._release(items, self.identities.get(evicted_id))

    def _release(self, held: list[_Held], user_id: str | None) -> None:
        """Write held copies, with `user_id` when it is known; their batches settle once acknowledged."""
        produce = self.producer.produce
        counts = self._counts
        for item in held:
            routed = item.routed
            if user_id is not None:
                event = {**routed.event, "userId": user_id}
                value = self.normaliser.codec.encode(event, routed.extra)  # type: ignore[arg-type]
                key = user_id
                STITCHED.inc()
            else:
                value, key = routed.value, routed.key
                if item.own_wait:
                    for destination in item.destinations:
                        self._unstitched[destination].inc()
            for destination in item.destinations:
                topic = self.dest_topics[destination]
                produce(topic, value, key)
                counts[topic] += 1
            self._unconfirmed.append(item.batch)

    def _emit(self, routed: RoutedEvent, destinations: list[str]) -> None:
        produce = self.producer.produce
        counts = self._counts
        for destination in destinations:
            topic = self.dest_topics[destination]
            produce(topic, routed.value, routed.key)
            counts[topic] += 1

    def _service_line(self) -> None:
        """Release what links (from any thread) and deadlines have freed since the last call."""
        line = self.line
        assert line is not None
        links = self._links
        if not line.by_id:
            links.clear()  # nobody waits: these links concern no held event
        while links:
            anonymous_id = links.popleft()
            if anonymous_id in line.by_id:
                self._release(line.release(anonymous_id), self.identities.get(anonymous_id))
        for anonymous_id, items in line.due():
            self._release(items, self.identities.get(anonymous_id))
        STITCH_WAITING.set(len(line))

    def poll(self) -> None:
        self.producer.poll(0)
        if self.failure:
            raise ProducerFatal(self.failure)
        # librdkafka's queue is empty and no failure was reported: every held copy written so far
        # is acknowledged (the same proof as a flush, without waiting for one).
        if self._unconfirmed and len(self.producer) == 0:
            self._confirm()
        if self.line is not None and (self.line or self._links):
            self._service_line()

    def drain(self, timeout: float) -> None:
        """Give waiting events the rest of their wait (links still come from the identities
        reader), at most `timeout` seconds, then write what is left with whatever is known, so every
        batch finishes. Every other write is flushed before its batch is marked done."""
        line = self.line
        if line is None:
            self._flush()
            self._confirm()
            return
        end = time.monotonic() + timeout
        while line and time.monotonic() < end:
            self._service_line()
            HEALTH.beat()
            self.producer.poll(min(0.05, max(0.0, end - time.monotonic())))  # serve callbacks, then look again
            if self.failure:
                raise ProducerFatal(self.failure)
        for anonymous_id, items in line.release_all():
            self._release(items, self.identities.get(anonymous_id))
        STITCH_WAITING.set(0)
        self._flush()
        self._confirm()

    def revoke(self, partitions: list[TopicPartitionKey]) -> None:
        """Drop the revoked partitions' held events without writing them: their new owner redoes
        them from the last commit. (The loop drains first, so only a lost assignment or a drain that
        failed leaves any.) Their batches settle, so the partitions this process keeps go on."""
        line = self.line
        if line is None or not line:
            return
        gone = set(partitions)
        dropped, released = line.drop(lambda held: held.partition in gone)
        for held in dropped:
            held.batch.settle()
        for anonymous_id, items in released:
            self._release(items, self.identities.get(anonymous_id))
        STITCH_WAITING.set(len(line))

    def close(self) -> None:
        self.producer.flush(5)


def build(config: Config) -> tuple[ConsumerLoop, IdentityTopicReader]:
    settings, names = config.settings, config.names
    outputs = [names.dest(d) for d in settings.destinations]
    require_topics(config.kafka.admin(), [names.raw, names.identities, names.dlq(RAW), *outputs])
    identities = IdentityMap(settings.identity_cache_size)
    reader = IdentityTopicReader(config.kafka, names.identities, identities)
    enrichers = [
        GeoEnricher(settings.geoip_database, settings.ip_cache_size),
        UserAgentEnricher(settings.ua_cache_size),
    ]
    normaliser = Normaliser(settings.destinations, identities, enrichers)
    strategy = NormaliseStrategy(
        config.kafka,
        names,
        settings.destinations,
        normaliser,
        config.dlq(),
        stitch_wait_ms=settings.normalize_stitch_wait_ms,
    )
    loop = ConsumerLoop(config.kafka, NORMALIZE_ROLE, [names.raw], strategy, batch_size=settings.consume_batch_size)
    return loop, reader
