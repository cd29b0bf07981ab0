"""`segment-worker dlq replay DEST|raw`: sending dead letters back where they came from.

Replay re-produces each dead letter to its `original_topic` (same key and value; header
`replayed_from` = dlq topic:partition:offset, and `replay_run` = the run's id), so a destination's
letters go back to its sink and `raw` letters go back through the normaliser. It tracks its
progress in a consumer group of its own, named after the destination and the filters, and commits
a position only after every re-produce before it was acknowledged: a replay that crashes or is
killed resumes where it left off when run again with the same arguments. A duplicate is still
possible for the last unacknowledged batch, and harmless: destinations dedupe by messageId
(insert_id, uniqueId, ...).

A run replays the letters that were in the topic when it started, and stops at each partition's
end as it was then (`worker.dlq.inspect.Ends`). A letter that fails again while the run goes on
comes back to the very topic it reads, as a new letter past that end: it is left, uncommitted,
for the next run. (Reading until the topic fell quiet, as replay once did, re-replayed such
letters for ever.) A letter marked with this run's own `replay_run` is skipped too, should a
dead-letter writer carry the header over.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker.config import Config
from worker.dlq.headers import header_map
from worker.dlq.inspect import EOF_EVENTS, Ends, read_to_ends
from worker.kafka.producer import Producer
from worker.names import Names
from worker.segment.timestamps import millis_of


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


REPLAYED_FROM = "replayed_from"  # dlq topic:partition:offset of the letter a message was re-produced from
REPLAY_RUN = "replay_run"  # the id of the replay run that re-produced it
_OWN_HEADERS = (REPLAYED_FROM, REPLAY_RUN)


@dataclass
class ReplayReport:
    run: str = ""
    matched: int = 0
    replayed: int = 0
    skipped: int = 0
    later: int = 0  # letters written after the run started (its own among them): left for the next run
    by_reason: Counter[str] = field(default_factory=Counter)
    targets: Counter[str] = field(default_factory=Counter)


def _target_topic(names: Names, destination: str, headers: dict[str, str]) -> str:
    return headers.get("original_topic") or names.replay_target(destination)


def replay(
    config: Config,
    destination: str,
    filters: ReplayFilter,
    max_messages: int | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    batch_size: int = 500,
    timeout: float = 3600.0,
) -> ReplayReport:
    topic = config.names.dlq(destination)
    started = time.monotonic()
    report = ReplayReport(run=uuid.uuid4().hex)
    ends = Ends.now(config.kafka, topic)  # before the first re-produce: none of its failures is before these
    # Commits happen only after the re-produce is acknowledged.
    consumer = config.kafka.consumer(
        f"dlq-replay-{destination}-{filters.group_suffix()}",
        {"enable.auto.commit": "false", "statistics.interval.ms": "0", **EOF_EVENTS},
    )
    producer = None if dry_run else config.kafka.producer()
    try:
        consumer.subscribe(
            [topic],
            on_assign=lambda _c, partitions: ends.assign(tp.partition for tp in partitions),
            on_revoke=lambda _c, partitions: ends.revoke(tp.partition for tp in partitions),
        )
        pending: list[Message] = []
        for message in read_to_ends(consumer, ends, started + timeout):
            headers = header_map(message.headers())
            if headers.get(REPLAY_RUN) == report.run:  # our own re-produce failed again: next run's
                report.later += 1
                continue
            if not filters.matches(headers):
                report.skipped += 1
                pending.append(message)
                continue
            if max_messages is not None and report.matched >= max_messages:
                break
            report.matched += 1
            report.by_reason[headers.get("error", "?")[:200]] += 1
            target = _target_topic(config.names, destination, headers)
            report.targets[target] += 1
            pending.append(message)
            if producer is not None:
                replayed_from = f"{message.topic()}:{message.partition()}:{message.offset()}"
                kept = [(k, v) for k, v in (message.headers() or []) if k not in _OWN_HEADERS]
                producer.produce(
                    target,
                    message.value(),
                    message.key(),
                    _fail_on_error,
                    [*kept, (REPLAYED_FROM, replayed_from.encode()), (REPLAY_RUN, report.run.encode())],
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
    report.later += ends.later
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
    if report.later:
        out.write(f"{report.later} dead letters written since the replay started were seen and left for the next run\n")
    for target, count in report.targets.most_common():
        out.write(f"  {count:>8}  -> {target}\n")
    for reason, count in report.by_reason.most_common(20):
        out.write(f"  {count:>8}  {reason}\n")
