"""`segment-worker dlq inspect DEST|raw`: what is in a dead-letter topic, by kind and reason, with samples.

Both inspect and replay read a dead-letter topic up to where it ended when they started (`Ends`),
not until it falls quiet: letters keep arriving while sinks and the normaliser run, and a replay's
own re-produced letters that fail again come back to the very topic it reads. Reading "until
quiet" never ended while they did.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker.avro_codec import EventCodec
from worker.config import Config
from worker.dlq.headers import header_map
from worker.kafka.clients import KafkaClients
from worker.kafka.reading import partitions_of
from worker.tail import decode_value

# Nothing at all arriving (no letter before the ends, no end-of-partition event) for this long
# also ends a read: a backstop for a partition whose end is never reported.
IDLE_SECONDS = 2.0
_GRACE_SECONDS = 1.0  # for the first fetch after an assignment to be answered
# The property that makes librdkafka report each partition's end as it reaches it.
EOF_EVENTS = {"enable.partition.eof": "true"}


class Ends:
    """Where a read of `topic` stops: each partition's end offset (the offset of the next letter
    written to it) when the read started. A letter at or past its partition's end was written
    after the start, and is left for the next read.

    Also what the consumer has been assigned (a replay is a group member) and which of its
    partitions have been read to their end: the read is over when all of them have."""

    def __init__(self, topic: str, ends: dict[int, int]) -> None:
        self.topic = topic
        self.ends = ends
        self.assigned: set[int] = set()
        self.done: set[int] = set()
        self.settled = False  # an assignment is in place (none yet, or a rebalance under way: False)
        self.later = 0  # letters seen that were written after the start

    @classmethod
    def now(cls, clients: KafkaClients, topic: str, timeout: float = 15.0) -> Ends:
        """Each partition's end now: its high watermark, confirmed by reading on from it to the
        end-of-partition event. On Apache Kafka nothing is read and the end is the watermark; the
        embedded broker reports the base offset of the last batch + 1 when that batch held several
        letters (docs/ARCHITECTURE.md), and reading on finds the real end."""
        reader = clients.reader("dlq-ends", EOF_EVENTS)
        try:
            ends = {}
            for partition in partitions_of(reader, topic):
                marks = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout, cached=False)
                if marks is None:  # older confluent-kafka: a timeout
                    raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"no watermarks for {topic}[{partition}]"))
                ends[partition] = marks[1]
            reader.assign([TopicPartition(topic, partition, high) for partition, high in ends.items()])
            open_partitions = set(ends)
            deadline = time.monotonic() + timeout
            while open_partitions and time.monotonic() < deadline:
                for message in reader.consume(1000, 0.2):
                    partition, error = message.partition(), message.error()
                    if error is None:
                        ends[partition] = max(ends[partition], message.offset() + 1)
                    elif error.code() == KafkaError._PARTITION_EOF:
                        ends[partition] = max(ends[partition], message.offset())
                        open_partitions.discard(partition)
        finally:
            reader.close()
        return cls(topic, ends)

    def assign(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.assigned.add(partition)
            if self.ends.get(partition, 0) <= 0:  # empty when the read started (or created since)
                self.done.add(partition)
        self.settled = True

    def revoke(self, partitions: Iterable[int]) -> None:
        self.assigned.difference_update(partitions)
        self.settled = False  # until the rebalance's assignment arrives

    def within(self, message: Message) -> bool:
        """Whether `message` was in the topic when the read started; its partition is done once
        its last such letter (or a later one) is seen."""
        partition, offset = message.partition(), message.offset()
        end = self.ends.get(partition, 0)
        if offset >= end - 1:
            self.done.add(partition)
        if offset >= end:
            self.later += 1
            return False
        return True

    def reached_eof(self, partition: int, offset: int) -> None:
        if offset >= self.ends.get(partition, 0):
            self.done.add(partition)

    def finished(self) -> bool:
        return self.settled and self.assigned <= self.done


def read_to_ends(consumer: Consumer, ends: Ends, deadline: float, idle: float = IDLE_SECONDS) -> Iterator[Message]:
    """The letters of `ends.topic` that were there when `ends` was taken, until every partition
    the consumer holds is read to its end (or, as a backstop, nothing arrived for `idle` seconds),
    or until the monotonic `deadline`. `consumer` must have EOF_EVENTS set. Letters written since
    are skipped (counted in `ends.later`); a replay's own re-produced letters are among them."""
    last_heard: float | None = None
    while time.monotonic() < deadline and not ends.finished():
        now = time.monotonic()
        if last_heard is None:
            if ends.settled:
                last_heard = now + _GRACE_SECONDS
        elif now - last_heard >= idle:
            return
        for message in consumer.consume(500, 0.2):
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    ends.reached_eof(message.partition(), message.offset())
                    last_heard = time.monotonic()
                continue  # other errors (a transient broker error) are retried by librdkafka
            if ends.within(message):
                last_heard = time.monotonic()
                yield message


@dataclass
class Inspection:
    topic: str
    total: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    oldest: str | None = None
    newest: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "total": self.total,
            "by_kind": dict(self.by_kind.most_common()),
            "by_reason": dict(self.by_reason.most_common()),
            "oldest": self.oldest,
            "newest": self.newest,
            "samples": self.samples,
        }


def inspect(config: Config, destination: str, samples: int = 3, timeout: float = 60.0) -> Inspection:
    topic = config.names.dlq(destination)
    deadline = time.monotonic() + timeout
    ends = Ends.now(config.kafka, topic)
    consumer = config.kafka.reader("dlq-inspect", EOF_EVENTS)
    result = Inspection(topic)
    codec = EventCodec()
    try:
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in ends.ends])
        ends.assign(ends.ends)
        for message in read_to_ends(consumer, ends, deadline):
            headers = header_map(message.headers())
            result.total += 1
            result.by_kind[headers.get("error_kind", "?")] += 1
            result.by_reason[headers.get("error", "?")[:200]] += 1
            failed_at = headers.get("failed_at")
            if failed_at:
                result.oldest = min(result.oldest or failed_at, failed_at)
                result.newest = max(result.newest or failed_at, failed_at)
            if len(result.samples) < samples:
                result.samples.append(
                    {
                        "partition": message.partition(),
                        "offset": message.offset(),
                        "key": message.key().decode("utf-8", "replace") if message.key() else None,
                        "headers": headers,
                        "value": decode_value(message.value(), codec),
                    }
                )
    finally:
        consumer.close()
    return result


def print_inspection(result: Inspection, out: IO[str]) -> None:
    out.write(f"{result.topic}: {result.total} dead letters")
    if result.total:
        out.write(f" (failed between {result.oldest} and {result.newest})")
    out.write("\n\nby kind:\n")
    for kind, count in result.by_kind.most_common():
        out.write(f"  {count:>8}  {kind}\n")
    out.write("\nby reason:\n")
    for reason, count in result.by_reason.most_common(20):
        out.write(f"  {count:>8}  {reason}\n")
    if len(result.by_reason) > 20:
        out.write(f"  ... and {len(result.by_reason) - 20} more reasons (--json lists all)\n")
    for sample in result.samples:
        out.write("\n" + orjson.dumps(sample, option=orjson.OPT_INDENT_2).decode() + "\n")
