"""Which offsets may be committed: the contiguous prefix, per partition, of batches whose outputs are done.

Batches finish out of order (a sink retries one batch while the next succeeds), but a committed
offset says "everything before this is done", so only a done prefix may be stored. Tracking is per
consumed batch and partition, not per message: one ticket per partition a batch touches.

The tracker also notices what the consumer skipped: within one assignment a partition's offsets
follow on from each other, and the first one after an assignment is the committed offset. A jump
forward is a gap: expected on a compacted topic, after a transaction's marker, or where retention
removed what was committed, and a loss anywhere else (a broker that served records out of order).
So a gap is first read again: given a `reread` (the loop's seek back to the gap's first offset),
the partition's messages from the gap on are held back from the batch (the re-read brings them
again) and the same gap is re-read up to `rereads` times. A broker that skipped records serves them
then (`recovered`); a gap that every re-read shows again is the log's own (a marker, compaction,
retention) and is reported (`Gap`), never hidden: the loop logs and counts both. Bounded, so a
legitimate gap costs a few fetches and never stalls the partition.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from confluent_kafka import Message

TopicPartitionKey = tuple[str, int]


class Gap(NamedTuple):
    """Offsets [expected, got) of a partition that were not consumed."""

    partition: TopicPartitionKey
    expected: int
    got: int


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


class Rereading(NamedTuple):
    """A gap being read again: the gap as first seen, and how many times it has been re-read."""

    gap: Gap
    attempts: int


class OffsetTracker:
    def __init__(self, reread: Callable[[Gap], bool] | None = None, rereads: int = 3) -> None:
        """`reread(gap)` moves the partition's fetch back to `gap.expected` and says whether it could;
        without one, every gap is reported as soon as it is seen."""
        self._in_flight: dict[TopicPartitionKey, deque[Ticket]] = {}
        self._next: dict[TopicPartitionKey, int] = {}  # the offset each partition should show next
        self._reread = reread
        self._rereads = rereads
        self._rereading: dict[TopicPartitionKey, Rereading] = {}
        self.gaps: list[Gap] = []  # found by `track` and kept, for the caller to report and clear
        self.recovered: list[Rereading] = []  # gaps a re-read filled, for the caller to report and clear

    def expect(self, key: TopicPartitionKey, offset: int | None) -> None:
        """The partition was just assigned and starts at `offset` (its committed offset; None when
        it has none, and auto.offset.reset decides)."""
        self._rereading.pop(key, None)
        if offset is None:
            self._next.pop(key, None)
        else:
            self._next[key] = offset

    def track(self, messages: list[Message]) -> Batch:
        """Messages of one consume() call, in order; their tickets join each partition's queue. A
        partition being re-read from a gap has its messages from the gap on left out of the batch."""
        seen = _per_partition(messages)
        following = self._next
        held: dict[TopicPartitionKey, int] = {}  # partition -> offset its fetch was moved back to
        for key, (offset, count) in seen.items():
            # Contiguous, and on from the last batch (or the assignment), exactly when the count
            # matches: one comparison a partition, the messages are looked at only when it does not.
            start = following.get(key)
            if start is not None and offset + 1 - start != count:
                back_to = self._judge_gaps(messages, key, start)
                if back_to is not None:
                    held[key] = back_to
            elif self._rereading:
                self._filled(key)
        if held:
            messages = _before_gaps(messages, held)
            seen = _per_partition(messages)
        tickets = {}
        for key, (offset, _count) in seen.items():
            ticket = tickets[key] = Ticket(offset)
            self._in_flight.setdefault(key, deque()).append(ticket)
            following[key] = offset + 1
        following.update(held)
        return Batch(messages, tickets)

    def _judge_gaps(self, messages: list[Message], key: TopicPartitionKey, expected: int) -> int | None:
        """Report the partition's gaps in this batch, in order, up to the first one to read again;
        return that gap's first offset (None when every gap was kept)."""
        rereading = self._rereading.pop(key, None)
        for message in messages:
            if (message.topic(), message.partition()) != key:
                continue
            offset = message.offset()
            if offset > expected:
                gap = Gap(key, expected, offset)
                attempts = 1
                if rereading is not None:
                    if rereading.gap.expected == expected:
                        attempts = rereading.attempts + 1
                    else:  # what was skipped came, and this is a new gap after it
                        self.recovered.append(rereading)
                    rereading = None
                if attempts <= self._rereads and self._reread is not None and self._reread(gap):
                    self._rereading[key] = Rereading(gap, attempts)
                    return expected
                self.gaps.append(gap)
            elif rereading is not None and offset == expected:
                self.recovered.append(rereading)
                rereading = None
            expected = max(expected, offset + 1)  # an offset below it is a re-read, not a gap
        return None

    def _filled(self, key: TopicPartitionKey) -> None:
        """A partition being re-read followed on from its gap's first offset: the gap is filled."""
        rereading = self._rereading.pop(key, None)
        if rereading is not None:
            self.recovered.append(rereading)

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
            self._next.pop(key, None)
            self._rereading.pop(key, None)


def _per_partition(messages: list[Message]) -> dict[TopicPartitionKey, list[int]]:
    """Per partition: [its highest offset in the batch, how many messages it has there] (one
    lookup a message; two dicts cost twice that, bench/offset_tracking.py)."""
    seen: dict[TopicPartitionKey, list[int]] = {}
    for message in messages:
        key = (message.topic(), message.partition())
        entry = seen.get(key)
        if entry is None:
            seen[key] = [message.offset(), 1]
        else:
            entry[0] = message.offset()  # offsets rise within a partition
            entry[1] += 1
    return seen


def _before_gaps(messages: list[Message], held: dict[TopicPartitionKey, int]) -> list[Message]:
    """The batch without each held partition's messages from its gap on (they come again)."""
    kept = []
    for message in messages:
        back_to = held.get((message.topic(), message.partition()))
        if back_to is None or message.offset() < back_to:
            kept.append(message)
    return kept
