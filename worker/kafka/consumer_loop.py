"""The one consumer loop every role runs.

It owns the Kafka side of at-least-once: consume in batches, hand each message to a `Strategy`
(the role's processing), store a message's offset only when the strategy says all its outputs are
acknowledged, commit on revoke and on shutdown, and pause partitions while the strategy refuses
work (backpressure). The strategy owns what "processing" and "acknowledged" mean.

Pause state is kept per partition (`_paused`) and re-stated on every assignment, because librdkafka
keeps an application pause on a partition across revoke and reassignment: a partition assigned
while the loop refuses work (its carry of refused batches is not empty) is paused, any other
assigned partition is resumed, a revoked or lost partition is forgotten, and when the carry
empties (taken, or released on a revoke) every partition still owned is resumed. That holds for
eager, cooperative-sticky and KIP-848 (`group.protocol=consumer`) assignment alike.

Commits: librdkafka auto-commits *stored* offsets every `auto.commit.interval.ms`
(`enable.auto.offset.store=false`, so nothing is stored before it is done); revoke and shutdown
commit synchronously so a new owner starts exactly where we stopped.
"""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker import logs, metrics
from worker.health import HEALTH
from worker.kafka.clients import KafkaClients
from worker.kafka.offsets import Batch, Gap, OffsetTracker, TopicPartitionKey

log = logs.get(__name__)

GAPS_LOGGED = 100  # a transactional producer leaves a gap per transaction: log the first ones, count all
# Re-reads of one gap before it is taken for the log's own (a marker, compaction, retention). One
# re-read serves what a consumer was moved past (tests/unit/test_consumer_loop.py); the other two
# give a broker still busy with the records another chance. Each re-read of a real gap costs a fetch.
GAP_REREADS = 3
COMMITTED_TIMEOUT = 5.0  # seconds for the committed offsets of a new assignment


class Backpressure(Exception):
    """Raised by `Strategy.submit` before taking anything: the loop pauses and offers the batch again."""


class Strategy(Protocol):
    def submit(self, batch: Batch) -> None:
        """Take a batch; call `batch.done()` (on the loop's thread) once all its outputs are acknowledged."""
        ...

    def poll(self) -> None:
        """Make progress without blocking: serve delivery callbacks, send due batches, report completions."""
        ...

    def drain(self, timeout: float) -> None:
        """Finish in-flight work, waiting at most `timeout` seconds."""
        ...

    def revoke(self, partitions: list[TopicPartitionKey]) -> None:
        """Drop unfinished work for partitions this process no longer owns (their new owner redoes it)."""
        ...

    def close(self) -> None: ...


def _keys(partitions: list[TopicPartition]) -> list[TopicPartitionKey]:
    return [(p.topic, p.partition) for p in partitions]


def _rebalances_incrementally(config: dict[str, Any]) -> bool:
    """Whether librdkafka runs this group's rebalances incrementally (COOPERATIVE: a callback gets only
    the partitions that change) rather than eagerly. KIP-848 groups always do; classic ones do when
    the assignors are cooperative, and librdkafka refuses a mix of eager and cooperative assignors."""
    if str(config.get("group.protocol", "classic")).strip().lower() == "consumer":
        return True
    strategies = str(config.get("partition.assignment.strategy", "range,roundrobin")).lower()
    return "cooperative-sticky" in (s.strip() for s in strategies.split(","))


class ConsumerLoop:
    def __init__(
        self,
        clients: KafkaClients,
        role: str,
        topics: list[str],
        strategy: Strategy,
        *,
        batch_size: int = 1000,
        poll_timeout: float = 0.5,
        drain_timeout: float = 20.0,
        overrides: dict[str, str] | None = None,
        bounded_prefetch: bool = False,
        gap_rereads: int = GAP_REREADS,
    ) -> None:
        """`role` names the consumer group (the clients' group prefix + role). A strategy that can
        refuse work (Backpressure) wants `bounded_prefetch` (worker.kafka.clients.BOUNDED_PREFETCH)."""
        config = clients.consumer_config(role, overrides, bounded_prefetch=bounded_prefetch)
        self.config: dict[str, Any] = {**config, "stats_cb": self._on_stats}
        self.topics = topics
        self.strategy = strategy
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.drain_timeout = drain_timeout
        self.tracker = OffsetTracker(self._seek_back, gap_rereads)
        self.assignment: set[TopicPartitionKey] = set()
        self._carry: deque[Batch] = deque()  # refused by the strategy; offered again, in order
        # Owned partitions this loop has paused (backpressure): of the partitions we own, exactly the
        # ones librdkafka has paused.
        self._paused: set[TopicPartitionKey] = set()
        self._incremental = _rebalances_incrementally(self.config)
        self._stopping = False
        self._drained_for_shutdown = False
        self._consumer: Consumer | None = None
        self._gaps_logged = 0

    def stop(self) -> None:
        """Ask the loop to finish; safe from a signal handler."""
        self._stopping = True

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None) -> None:
        consumer = self._consumer = Consumer(self.config)
        consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("consumer started", group=self.config["group.id"], topics=self.topics)
        try:
            while not self._stopping and not (until and until()):
                HEALTH.beat()
                self.strategy.poll()
                self._store_done()
                if self._carry and not self._offer_carry():
                    # Still refused: keep serving the group protocol, take nothing new.
                    self._take(consumer.consume(self.batch_size, 0.05))
                    continue
                self._take(self._available(consumer))
        finally:
            self._shutdown(consumer)

    def _available(self, consumer: Consumer) -> list[Message]:
        """What is there now, up to a batch; when nothing is, the first message to come and what
        came with it. (`consume(n, timeout)` waits for n messages or the timeout: a slow input
        would hold each message up to poll_timeout just to fill a batch.)"""
        messages = consumer.consume(self.batch_size, 0)
        if messages:
            return messages
        messages = consumer.consume(1, self.poll_timeout)
        if messages and self.batch_size > 1:
            messages.extend(consumer.consume(self.batch_size - 1, 0))
        return messages

    def _take(self, messages: list[Message]) -> None:
        if not messages:
            return
        metrics.BATCH_SIZE.observe(len(messages))
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            else:
                self._on_error(error)
        if not good:
            return
        per_topic = Counter(m.topic() for m in good) if len(self.topics) > 1 else {self.topics[0]: len(good)}
        for topic, count in per_topic.items():
            metrics.CONSUMED.labels(topic).inc(count)
        batch = self.tracker.track(good)
        if self.tracker.gaps or self.tracker.recovered:
            self._report_gaps()
        if not batch.messages:  # all of it is being read again
            return
        if self._carry:  # keep order: nothing overtakes a refused batch
            self._carry.append(batch)
            return
        try:
            self.strategy.submit(batch)
        except Backpressure:
            self._carry.append(batch)
            self._pause()

    def _offer_carry(self) -> bool:
        """Offer refused batches again, oldest first; True when all were taken."""
        while self._carry:
            try:
                self.strategy.submit(self._carry[0])
            except Backpressure:
                return False
            self._carry.popleft()
        self._resume()
        return True

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaException(error)
        log.warning("consumer error", error=str(error))

    # -- offsets ----------------------------------------------------------------------------------

    def _seek_back(self, gap: Gap) -> bool:
        """Move a partition's fetch back to the first offset of a gap, to read it again (the tracker
        holds back what came after it). False when the consumer would not: the gap is then kept."""
        if self._consumer is None:
            return False
        topic, partition = gap.partition
        try:
            self._consumer.seek(TopicPartition(topic, partition, gap.expected))
        except KafkaException as exc:
            log.warning("could not read a gap again", topic=topic, partition=partition, error=str(exc))
            return False
        return True

    def _report_gaps(self) -> None:
        """Offsets the consumer never saw, even when read again. A compacted topic, a transaction's
        marker or retention explain some; anything else lost records (a broker that served them out
        of order), so each is logged (the first hundred; the metrics count all). And gaps a re-read
        filled: the broker had skipped records and served them when asked again."""
        for rereading in self.tracker.recovered:
            topic, partition = rereading.gap.partition
            metrics.OFFSETS_RECOVERED.labels(topic).inc(rereading.gap.got - rereading.gap.expected)
            log.warning(
                "gap filled when read again: offsets the broker skipped at first were served",
                topic=topic,
                partition=partition,
                first=rereading.gap.expected,
                last=rereading.gap.got - 1,
                rereads=rereading.attempts,
            )
        self.tracker.recovered.clear()
        for gap in self.tracker.gaps:
            topic, partition = gap.partition
            metrics.OFFSET_GAPS.labels(topic).inc()
            metrics.OFFSETS_SKIPPED.labels(topic).inc(gap.got - gap.expected)
            self._gaps_logged += 1
            if self._gaps_logged <= GAPS_LOGGED:
                log.warning(
                    "offsets skipped: not consumed, not even when read again (compaction, a transaction"
                    " marker or retention explain some gaps; otherwise the broker did not serve these records)",
                    topic=topic,
                    partition=partition,
                    first=gap.expected,
                    last=gap.got - 1,
                    further_gaps_only_counted=self._gaps_logged == GAPS_LOGGED,
                )
        self.tracker.gaps.clear()

    def _expect_committed(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Tell the tracker where each assigned partition starts, so a first batch that does not
        begin there shows as a gap. One OffsetFetch a rebalance; without an answer, nothing is
        compared for the partitions' first batch."""
        try:
            committed = consumer.committed(partitions, timeout=COMMITTED_TIMEOUT)
        except KafkaException as exc:
            log.info("committed offsets not read; first batches unchecked", error=str(exc))
            committed = [TopicPartition(p.topic, p.partition, -1001) for p in partitions]
        for tp in committed:
            self.tracker.expect((tp.topic, tp.partition), tp.offset if tp.offset >= 0 else None)

    def _store_done(self) -> None:
        ready = self.tracker.pop_committable()
        if not ready or self._consumer is None:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in ready.items() if (t, p) in self.assignment]
        if not offsets:
            return
        try:
            self._consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:  # e.g. a partition revoked between two calls: its new owner redoes it
            log.warning("could not store offsets", error=str(exc))

    def _commit(self, consumer: Consumer, reason: str) -> None:
        try:
            consumer.commit(asynchronous=False)
            metrics.COMMITS.labels(reason).inc()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("commit failed", reason=reason, error=str(exc))

    # -- backpressure -----------------------------------------------------------------------------

    def _pause(self) -> None:
        """The strategy refused a batch: pause every owned partition not paused yet."""
        unpaused = self.assignment - self._paused
        if not unpaused or self._consumer is None:
            return
        self._consumer.pause([TopicPartition(t, p) for t, p in unpaused])
        self._paused |= unpaused
        metrics.PAUSED_PARTITIONS.set(len(self._paused))

    def _resume(self) -> None:
        """The carry is empty: resume every partition we own. (All of them, not only `_paused`: it
        costs nothing and leaves no partition paused whatever librdkafka kept from before.)"""
        if not self._paused or self._consumer is None:
            return
        self._paused.clear()
        if self.assignment:
            self._consumer.resume([TopicPartition(t, p) for t, p in self.assignment])
        metrics.PAUSED_PARTITIONS.set(0)

    # -- statistics -------------------------------------------------------------------------------

    def _on_stats(self, text: str) -> None:
        """Export consumer lag per assigned partition (called from consume(), on the loop's thread)."""
        try:
            stats = orjson.loads(text)
        except orjson.JSONDecodeError:
            return
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, partition_stats in topic_stats.get("partitions", {}).items():
                lag = partition_stats.get("consumer_lag", -1)
                if partition != "-1" and (topic, int(partition)) in self.assignment and lag >= 0:
                    metrics.CONSUMER_LAG.labels(topic, partition).set(lag)

    # -- rebalance --------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take the partitions, then state their pause: paused iff we are refusing work (the carry is
        not empty), else resumed. librdkafka keeps an application pause across revoke and
        reassignment, so a partition we paused while we owned it before would otherwise come back
        paused with nothing left to resume it."""
        metrics.REBALANCES.labels("assign").inc()
        # Assign here rather than leave it to confluent-kafka after this callback returns: pausing
        # or resuming a partition librdkafka holds no state for yet (one this consumer never owned)
        # is silently skipped, and after the assign it has that state. These are the calls the
        # client would make (incremental_assign for cooperative and KIP-848 groups).
        if self._incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        keys = _keys(partitions)
        self.assignment.update(keys)
        if partitions:
            self._expect_committed(consumer, partitions)
            if self._carry:
                consumer.pause(partitions)
                self._paused.update(keys)
            else:
                consumer.resume(partitions)
                self._paused.difference_update(keys)
            metrics.PAUSED_PARTITIONS.set(len(self._paused))
        self._update_readiness()
        log.info("partitions assigned", partitions=[f"{t}[{p}]" for t, p in _keys(partitions)])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish what we can, store and commit it, then let the partitions go."""
        metrics.REBALANCES.labels("revoke").inc()
        self._drain()
        self._store_done()
        self._commit(consumer, "revoke")
        self._release(_keys(partitions))
        log.info("partitions revoked", partitions=[f"{t}[{p}]" for t, p in _keys(partitions)])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lost (session expired): someone else may own them already, so commit nothing."""
        metrics.REBALANCES.labels("lost").inc()
        self._release(_keys(partitions))
        log.warning("partitions lost", partitions=[f"{t}[{p}]" for t, p in _keys(partitions)])

    def _release(self, keys: list[TopicPartitionKey]) -> None:
        gone = set(keys)
        self.strategy.revoke(keys)
        self.tracker.forget(keys)
        self._carry = deque(kept for batch in self._carry if (kept := batch.without(gone)) is not None)
        self.assignment -= gone
        self._paused -= gone  # forgotten: a later assignment of them states their pause afresh
        for topic, partition in gone:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(topic, str(partition))
        if not self._carry:
            # Nothing refused is left (it was all the released partitions'): the partitions we keep
            # (cooperative, KIP-848) must fetch again, or they would stay paused for good.
            self._resume()
        metrics.PAUSED_PARTITIONS.set(len(self._paused))
        self._update_readiness()

    def _update_readiness(self) -> None:
        metrics.ASSIGNED_PARTITIONS.set(len(self.assignment))
        HEALTH.set_ready(bool(self.assignment), f"{len(self.assignment)} partitions assigned")

    # -- shutdown ---------------------------------------------------------------------------------

    def _shutdown(self, consumer: Consumer) -> None:
        """Finish or hand back in-flight work, commit what is done, leave the group."""
        try:
            self._drain()
            self._store_done()
            self._commit(consumer, "shutdown")
        finally:
            # close() leaves the group now (the others rebalance without waiting for a session
            # timeout); it runs _on_revoke once more, which must not drain again: the shutdown's
            # drain already had its time, and what it left unfinished stays uncommitted.
            self._drained_for_shutdown = True
            consumer.close()
            self.strategy.close()
            HEALTH.set_ready(False, "stopped")
            log.info("consumer stopped", group=self.config["group.id"], unfinished=self.tracker.pending())

    def _drain(self) -> None:
        """Drain the strategy; a failed output only means its message stays uncommitted."""
        if self._drained_for_shutdown:
            return
        try:
            self.strategy.drain(self.drain_timeout)
        except Exception as exc:
            log.error("drain failed; unfinished messages stay uncommitted", error=str(exc))
