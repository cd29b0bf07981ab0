"""`segment-worker dlq inspect|replay DEST|raw`: what is in a dead-letter topic, and sending it back.

Replay re-produces each dead letter to its `original_topic` (same key and value; header
`replayed_from` = dlq topic:partition:offset), so a destination's letters go back to its sink and
`raw` letters go back through the normaliser. It tracks its progress in a consumer group of its
own, named after the destination and the filters, and commits a position only after every
re-produce before it was acknowledged: a replay that crashes or is killed resumes where it left
off when run again with the same arguments. A duplicate is still possible for the last
unacknowledged batch, and harmless: destinations dedupe by messageId (insert_id, uniqueId, ...).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker import logs
from worker.avro_codec import EventCodec
from worker.config import Settings
from worker.dead_letters import header_map
from worker.kafka.producer import Producer
from worker.segment.timestamps import millis_of
from worker.tail import decode_value

log = logs.get(__name__)

IDLE_SECONDS = 2.0  # a dead-letter topic quiet this long has been read to its end


def dlq_topic(settings: Settings, destination: str) -> str:
    return settings.topic(f"dlq.{destination}")


def _read_all(
    consumer: Consumer, idle: float, deadline: float, started: Callable[[], bool] = lambda: True
) -> Iterator[Message]:
    """Messages until the topic has been quiet for `idle` seconds, counted from when `started()` holds
    (a consumer group member has nothing to read before its assignment) plus the first fetch's moment."""
    while not started() and time.monotonic() < deadline:
        for message in consumer.consume(100, 0.2):  # serves the group protocol; nothing is assigned yet
            if message.error() is None:
                yield message
    last = time.monotonic() + 1.0
    while time.monotonic() < deadline and time.monotonic() - last < idle:
        for message in consumer.consume(500, 0.2):
            if message.error() is None:
                last = time.monotonic()
                yield message


# -- inspect -----------------------------------------------------------------------------------------


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


def inspect(settings: Settings, destination: str, samples: int = 3, timeout: float = 60.0) -> Inspection:
    topic = dlq_topic(settings, destination)
    consumer = Consumer({**settings.kafka_properties, "group.id": "segment-dlq-inspect", "enable.auto.commit": "false"})
    result = Inspection(topic)
    codec = EventCodec()
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise SystemExit(f"topic {topic!r} does not exist")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions])
        for message in _read_all(consumer, IDLE_SECONDS, time.monotonic() + timeout):
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


# -- replay ------------------------------------------------------------------------------------------


@dataclass
class ReplayFilter:
    reason: str | None = None  # a case-insensitive substring of the `error` header
    since: str | None = None  # ISO-8601: only letters that failed at or after this time
    since_ms: int | None = None

    def __post_init__(self) -> None:
        if self.since is not None:
            self.since_ms = millis_of(self.since)

    def matches(self, headers: dict[str, str]) -> bool:
        if self.reason and self.reason.lower() not in headers.get("error", "").lower():
            return False
        if self.since_ms is not None:
            failed_at = headers.get("failed_at")
            try:
                return failed_at is not None and millis_of(failed_at) >= self.since_ms
            except ValueError:
                return False
        return True

    def group_suffix(self) -> str:
        """Progress is kept per filter, so a different filter starts from the beginning."""
        text = f"reason={(self.reason or '').lower()}|since={self.since_ms or ''}"
        return hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclass
class ReplayReport:
    matched: int = 0
    replayed: int = 0
    skipped: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    targets: Counter[str] = field(default_factory=Counter)


def _target_topic(settings: Settings, destination: str, headers: dict[str, str]) -> str:
    original = headers.get("original_topic")
    if original:
        return original
    return settings.topic("raw" if destination == "raw" else f"dest.{destination}")


def replay(
    settings: Settings,
    destination: str,
    filters: ReplayFilter,
    max_messages: int | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    batch_size: int = 500,
    timeout: float = 3600.0,
) -> ReplayReport:
    topic = dlq_topic(settings, destination)
    group = settings.group(f"dlq-replay-{destination}-{filters.group_suffix()}")
    consumer = Consumer(
        {
            **settings.kafka_properties,
            "group.id": group,
            "enable.auto.commit": "false",  # commits happen only after the re-produce is acknowledged
            "auto.offset.reset": "earliest",
        }
    )
    producer = None if dry_run else Producer(settings.kafka_properties)
    report = ReplayReport()
    started = time.monotonic()
    try:
        assigned: list[TopicPartition] = []
        consumer.subscribe([topic], on_assign=lambda _c, partitions: assigned.extend(partitions))
        pending: list[Message] = []
        for message in _read_all(consumer, IDLE_SECONDS, started + timeout, lambda: bool(assigned)):
            headers = header_map(message.headers())
            if not filters.matches(headers):
                report.skipped += 1
                pending.append(message)
                continue
            if max_messages is not None and report.matched >= max_messages:
                break
            report.matched += 1
            report.by_reason[headers.get("error", "?")[:200]] += 1
            target = _target_topic(settings, destination, headers)
            report.targets[target] += 1
            pending.append(message)
            if producer is not None:
                replayed_from = f"{message.topic()}:{message.partition()}:{message.offset()}"
                kept = [(k, v) for k, v in (message.headers() or []) if k != "replayed_from"]
                producer.produce(
                    target,
                    message.value(),
                    message.key(),
                    _fail_on_error,
                    [*kept, ("replayed_from", replayed_from.encode())],
                )
                report.replayed += 1
                if rate:
                    _pace(report.replayed, rate, started)
            if len(pending) >= batch_size:
                _commit_after_flush(consumer, producer, pending)
                pending = []
        if pending:
            _commit_after_flush(consumer, producer, pending)
    finally:
        consumer.close()
    return report


def _fail_on_error(error: KafkaError | None, message: Message) -> None:
    if error is not None:
        raise KafkaException(error)  # surfaces from flush(): nothing after it is committed


def _commit_after_flush(consumer: Consumer, producer: Producer | None, done: list[Message]) -> None:
    """Commit past `done` only once every re-produce among them is acknowledged (none in a dry run)."""
    if producer is None:
        return
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} re-produced dead letters not acknowledged; progress not committed")
    highest: dict[tuple[str, int], int] = {}
    for message in done:
        highest[(message.topic(), message.partition())] = message.offset()
    consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in highest.items()], asynchronous=False)


def _pace(count: int, rate: float, started: float) -> None:
    ahead = count / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)


def print_replay(report: ReplayReport, dry_run: bool, out: IO[str]) -> None:
    verb = "would replay" if dry_run else "replayed"
    out.write(
        f"{verb} {report.matched if dry_run else report.replayed} dead letters "
        f"({report.skipped} did not match the filters)\n"
    )
    for target, count in report.targets.most_common():
        out.write(f"  {count:>8}  -> {target}\n")
    for reason, count in report.by_reason.most_common(20):
        out.write(f"  {count:>8}  {reason}\n")
