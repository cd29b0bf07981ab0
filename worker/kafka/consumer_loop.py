"""The one consumer loop every role runs.

It owns the Kafka side of at-least-once: consume in batches, hand each message to a `Strategy`
(the role's processing), store a message's offset only when the strategy says all its outputs are
acknowledged, commit on revoke and on shutdown, and pause partitions while the strategy refuses
work (backpressure). The strategy owns what "processing" and "acknowledged" mean.

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
from worker.kafka.offsets import Batch, OffsetTracker, TopicPartitionKey

log = logs.get(__name__)

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
    ) -> None:
        """`role` names the consumer group (the clients' group prefix + role)."""
        self.config: dict[str, Any] = {**clients.consumer_config(role, overrides), "stats_cb": self._on_stats}
        self.topics = topics
        self.strategy = strategy
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.drain_timeout = drain_timeout
        self.tracker = OffsetTracker()
        self.assignment: set[TopicPartitionKey] = set()
        self._carry: deque[Batch] = deque()  # refused by the strategy; offered again, in order
        self._paused = False
        self._stopping = False
        self._consumer: Consumer | None = None

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
                self._take(consumer.consume(self.batch_size, self.poll_timeout))
        finally:
            self._shutdown(consumer)

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
        if self._paused or self._consumer is None:
            return
        self._paused = True
        self._consumer.pause([TopicPartition(t, p) for t, p in self.assignment])
        metrics.PAUSED_PARTITIONS.set(len(self.assignment))

    def _resume(self) -> None:
        if not self._paused or self._consumer is None:
            return
        self._paused = False
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
        metrics.REBALANCES.labels("assign").inc()
        self.assignment.update(_keys(partitions))
        if self._paused:
            consumer.pause(partitions)
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
        for topic, partition in gone:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(topic, str(partition))
        if not self._carry:
            self._paused = False
            metrics.PAUSED_PARTITIONS.set(0)
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
            # timeout); it runs _on_revoke once more, which finds nothing left to do.
            consumer.close()
            self.strategy.close()
            HEALTH.set_ready(False, "stopped")
            log.info("consumer stopped", group=self.config["group.id"], unfinished=self.tracker.pending())

    def _drain(self) -> None:
        """Drain the strategy; a failed output only means its message stays uncommitted."""
        try:
            self.strategy.drain(self.drain_timeout)
        except Exception as exc:
            log.error("drain failed; unfinished messages stay uncommitted", error=str(exc))
