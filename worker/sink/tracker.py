"""The sink's bookkeeping: which consumed messages are still open, how many of each one's items are
unreported, the first failure among them, and when a whole batch is done.

A message is finished when all its items are reported: completed if none failed, otherwise
dead-lettered first (the strategy does that, then calls `complete`). A batch is done (its offsets
may be stored) when every one of its messages is completed. No Kafka client and no threads here.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import Message

from worker.kafka.offsets import Batch, TopicPartitionKey
from worker.sink.reports import Failed, ItemOutcome, Withdrawn


class _OpenBatch:
    __slots__ = ("batch", "remaining")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.remaining = len(batch.messages)


class OpenMessage:
    """One consumed message whose items are on their way."""

    __slots__ = ("_batch", "failure", "finished", "key", "message", "remaining", "settled")

    def __init__(self, batch: _OpenBatch, message: Message) -> None:
        self._batch = batch
        self.message = message
        self.key: TopicPartitionKey = (message.topic(), message.partition())
        self.remaining = 0  # items not yet reported
        self.failure: Failed | None = None  # the first failure among its items
        self.settled = False  # every item reported (or none to send)
        self.finished = False  # completed: counted towards its batch


class SinkTracker:
    def __init__(self) -> None:
        self._open: dict[TopicPartitionKey, set[OpenMessage]] = {}

    def open(self, batch: Batch) -> list[OpenMessage]:
        """Open every message of `batch`; each must then get `expect()` and its reports, or `fail()`."""
        state = _OpenBatch(batch)
        opened = []
        for message in batch.messages:
            entry = OpenMessage(state, message)
            self._open.setdefault(entry.key, set()).add(entry)
            opened.append(entry)
        return opened

    def expect(self, entry: OpenMessage, items: int) -> bool:
        """`items` were sent for `entry`; True if there were none (it is settled already)."""
        entry.remaining = items
        entry.settled = items == 0
        return entry.settled

    def fail(self, entry: OpenMessage, failure: Failed) -> None:
        """The message failed before any item was sent (it cannot be decoded or mapped)."""
        entry.failure = failure
        entry.remaining = 0
        entry.settled = True

    def report(self, entry: OpenMessage, outcome: ItemOutcome) -> bool:
        """One item's outcome; True when this report settled the message (all its items are in).

        A withdrawn item, or any report for a message already finished (its partition was revoked),
        changes nothing: the message is not ours any more.
        """
        if entry.finished or entry.settled or isinstance(outcome, Withdrawn):
            return False
        if isinstance(outcome, Failed) and entry.failure is None:
            entry.failure = outcome
        entry.remaining -= 1
        if entry.remaining == 0:
            entry.settled = True
            return True
        return False

    def complete(self, entry: OpenMessage) -> None:
        """The message is done (delivered, filtered, or its dead letter acknowledged)."""
        if entry.finished:
            return
        entry.finished = True
        entries = self._open.get(entry.key)
        if entries is not None:
            entries.discard(entry)
        batch = entry._batch
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.batch.done()

    def withdraw(self, partitions: Iterable[TopicPartitionKey]) -> int:
        """Forget the open messages of revoked partitions; their batches finish for the partitions kept.
        Returns how many were withdrawn."""
        withdrawn = 0
        for key in partitions:
            for entry in self._open.pop(key, set()):
                entry.failure = None
                self.complete(entry)
                withdrawn += 1
        return withdrawn

    def open_messages(self) -> int:
        return sum(len(entries) for entries in self._open.values())
