"""Which offsets may be committed: the contiguous prefix, per partition, of messages whose outputs are done.

Messages finish out of order (a batch envelope fans out to many outputs; a sink retries one batch
while the next succeeds), but a committed offset says "everything before this is done", so only a
done prefix may be stored.
"""

from __future__ import annotations

from collections import deque

TopicPartitionKey = tuple[str, int]


class Ticket:
    """One consumed message in flight. `done()` is called once, when all its outputs are acknowledged."""

    __slots__ = ("finished", "offset")

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.finished = False

    def done(self) -> None:
        self.finished = True


class OffsetTracker:
    def __init__(self) -> None:
        self._in_flight: dict[TopicPartitionKey, deque[Ticket]] = {}

    def track(self, topic: str, partition: int, offset: int) -> Ticket:
        ticket = Ticket(offset)
        self._in_flight.setdefault((topic, partition), deque()).append(ticket)
        return ticket

    def committable(self) -> dict[TopicPartitionKey, int]:
        """Pop the done prefix of each partition; returns the next offset to commit (last done + 1)."""
        ready: dict[TopicPartitionKey, int] = {}
        for key, tickets in self._in_flight.items():
            last = None
            while tickets and tickets[0].finished:
                last = tickets.popleft().offset
            if last is not None:
                ready[key] = last + 1
        return ready

    def pending(self) -> int:
        return sum(len(tickets) for tickets in self._in_flight.values())

    def forget(self, keys: list[TopicPartitionKey]) -> None:
        """Drop partitions we no longer own; their unfinished messages will be re-read by the new owner."""
        for key in keys:
            self._in_flight.pop(key, None)
