"""Which offsets may be committed: the contiguous prefix, per partition, of batches whose outputs are done.

Batches finish out of order (a sink retries one batch while the next succeeds), but a committed
offset says "everything before this is done", so only a done prefix may be stored. Tracking is per
consumed batch and partition, not per message: one ticket per partition a batch touches.
"""

from __future__ import annotations

from collections import deque

from confluent_kafka import Message

TopicPartitionKey = tuple[str, int]


class Ticket:
    """One partition's share of a batch in flight: its highest offset, and whether it is done."""

    __slots__ = ("finished", "offset")

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.finished = False


class Batch:
    """A consumed batch handed to a strategy. `done()` is called once, when all its outputs are acknowledged."""

    __slots__ = ("messages", "tickets")

    def __init__(self, messages: list[Message], tickets: dict[TopicPartitionKey, Ticket]) -> None:
        self.messages = messages
        self.tickets = tickets

    def done(self) -> None:
        for ticket in self.tickets.values():
            ticket.finished = True

    def without(self, gone: set[TopicPartitionKey]) -> Batch | None:
        """This batch minus the messages of partitions we no longer own (None if nothing is left)."""
        messages = [m for m in self.messages if (m.topic(), m.partition()) not in gone]
        if not messages:
            return None
        return Batch(messages, {k: t for k, t in self.tickets.items() if k not in gone})


class OffsetTracker:
    def __init__(self) -> None:
        self._in_flight: dict[TopicPartitionKey, deque[Ticket]] = {}

    def track(self, messages: list[Message]) -> Batch:
        """Messages of one consume() call, in order; their tickets join each partition's queue."""
        highest: dict[TopicPartitionKey, int] = {}
        for message in messages:
            highest[(message.topic(), message.partition())] = message.offset()  # offsets rise within a partition
        tickets = {}
        for key, offset in highest.items():
            ticket = tickets[key] = Ticket(offset)
            self._in_flight.setdefault(key, deque()).append(ticket)
        return Batch(messages, tickets)

    def pop_committable(self) -> dict[TopicPartitionKey, int]:
        """Remove the done prefix of each partition and return the next offset to commit for it
        (last done + 1). A second call returns only what finished since the first."""
        ready: dict[TopicPartitionKey, int] = {}
        for key, tickets in self._in_flight.items():
            last = None
            while tickets and tickets[0].finished:
                last = tickets.popleft().offset
            if last is not None:
                ready[key] = last + 1
        return ready

    def pending(self) -> int:
        """Unfinished partition-batches."""
        return sum(len(tickets) for tickets in self._in_flight.values())

    def forget(self, keys: list[TopicPartitionKey]) -> None:
        """Drop partitions we no longer own; their unfinished messages will be re-read by the new owner."""
        for key in keys:
            self._in_flight.pop(key, None)
