"""Reading a topic until it is quiet: the one helper behind tail, dlq inspect and replay, the demo's
accounting, the identity map's start-up load and the tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition


class TopicMissing(KafkaException):
    pass


def partitions_of(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=timeout)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise TopicMissing(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"topic {topic!r} does not exist"))
    return sorted(found.partitions)


def assign_all(consumer: Consumer, topics: Iterable[str], start: int = OFFSET_BEGINNING) -> list[TopicPartition]:
    """Assign every partition of `topics` at `start` (OFFSET_BEGINNING / OFFSET_END)."""
    assignment = [TopicPartition(t, p, start) for t in topics for p in partitions_of(consumer, t)]
    consumer.assign(assignment)
    return assignment


def read_batches_until_quiet(
    consumer: Consumer,
    idle: float | None,
    deadline: float | None = None,
    *,
    started: Callable[[], bool] = lambda: True,
    caught_up: Callable[[], bool] = lambda: True,
    grace: float = 1.0,
    batch: int = 500,
) -> Iterator[list[Message]]:
    """Yield batches of messages until none has arrived for `idle` seconds (None: never) and
    `caught_up()` holds, or until the monotonic `deadline`.

    Quiet time counts from when `started()` holds (a group member has nothing to read before its
    assignment), plus `grace` for the first fetch to be answered; until then the consumer is
    still polled so it serves the group protocol. Errors (partition EOF and the like) are skipped.
    """

    def expired() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    while not started() and not expired():
        if messages := [m for m in consumer.consume(100, 0.2) if m.error() is None]:
            yield messages
    last = time.monotonic() + grace
    wait = 0.1 if idle is None else min(0.2, max(idle / 2, 0.02))
    while not expired():
        if idle is not None and time.monotonic() - last >= idle and caught_up():
            return
        if messages := [m for m in consumer.consume(batch, wait) if m.error() is None]:
            last = time.monotonic()
            yield messages


def read_until_quiet(
    consumer: Consumer, idle: float | None, deadline: float | None = None, **options: Any
) -> Iterator[Message]:
    """`read_batches_until_quiet` (same options), one message at a time."""
    for messages in read_batches_until_quiet(consumer, idle, deadline, **options):
        yield from messages
