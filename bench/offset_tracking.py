"""What the consumer loop's offset-gap check costs per message (worker/kafka/offsets.py).

Side by side in one process, on the same consumed batches: the tracking the loop did before the
check (the highest offset per partition, a ticket per partition) and `OffsetTracker.track`, which
also counts each partition's messages and compares the count with the span of its offsets. Batches are
what a role sees at full speed: `--batch` messages spread over `--partitions` partitions, offsets
following on, one tracker across all batches (so every batch is compared with the one before).

    .venv/bin/python bench/offset_tracking.py [--batches 300] [--batch 1000] [--partitions 6]
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit
from collections import deque
from pathlib import Path

from confluent_kafka import Message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.kafka.offsets import Batch, OffsetTracker, Ticket


class WithoutGapCheck(OffsetTracker):
    """The tracking alone, as `track` was before the gap check."""

    def track(self, messages: list[Message]) -> Batch:
        highest: dict[tuple[str, int], int] = {}
        for message in messages:
            highest[(message.topic(), message.partition())] = message.offset()
        tickets = {}
        for key, offset in highest.items():
            ticket = tickets[key] = Ticket(offset)
            self._in_flight.setdefault(key, deque()).append(ticket)
        return Batch(messages, tickets)


def consumed(batches: int, size: int, partitions: int) -> list[list[Message]]:
    rng = random.Random(7)
    following = [0] * partitions
    out = []
    for _ in range(batches):
        batch = []
        for _ in range(size):
            partition = rng.randrange(partitions)
            batch.append(Message(topic="segment.raw", partition=partition, offset=following[partition]))
            following[partition] += 1
        out.append(batch)
    return out


def per_message_ns(tracker_type: type[OffsetTracker], batches: list[list[Message]]) -> float:
    def run() -> None:
        tracker = tracker_type()
        for batch in batches:
            tracker.track(batch)
        assert not tracker.gaps

    seconds = min(timeit.repeat(run, number=1, repeat=7))
    return seconds / sum(map(len, batches)) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args()
    batches = consumed(args.batches, args.batch, args.partitions)
    before = per_message_ns(WithoutGapCheck, batches)
    after = per_message_ns(OffsetTracker, batches)
    print(f"tracking without the gap check: {before:6.0f} ns a message")
    print(f"tracking with the gap check:    {after:6.0f} ns a message (+{after - before:.0f} ns)")


if __name__ == "__main__":
    main()
