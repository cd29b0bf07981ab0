"""SinkTracker, alone: which messages are open, the first failure among their items, and when a batch
is done. The messages are real ones, written to a topic of the test's own and read back once per
module; batches are built the way the consumer loop builds them (`OffsetTracker().track`)."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Message

from tests.kafka_helpers import read_count, settings_for
from worker.dlq.headers import Kind
from worker.kafka.admin import TopicSpec, create_topics
from worker.kafka.offsets import Batch, OffsetTracker
from worker.sink.reports import DELIVERED, Failed, Withdrawn
from worker.sink.tracker import SinkTracker

pytestmark = pytest.mark.integration

PER_PARTITION = 4
PERMANENT = Failed(Kind.PERMANENT, "HTTP 400: bad field", 0, 400)
EXHAUSTED = Failed(Kind.EXHAUSTED, "gave up after 3 attempts: HTTP 500", 3, 500)
REVOKED = Withdrawn("partition revoked")


@pytest.fixture(scope="module")
def messages(broker) -> dict[int, list[Message]]:
    """Real consumed messages: partition -> its messages, in offset order."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    config = settings_for(broker, prefix, partitions=2)
    topic = config.names.full_topic("tracker")
    create_topics(config.kafka.admin(), [TopicSpec(topic, 2, {})])
    producer = config.kafka.producer()
    for partition in (0, 1):
        for i in range(PER_PARTITION):
            producer.produce(topic, f"p{partition}-{i}".encode(), f"k{i}", partition=partition)
    assert producer.flush(15) == 0
    consumed = read_count(config, topic, 2 * PER_PARTITION, timeout=30)
    assert len(consumed) == 2 * PER_PARTITION
    by_partition: dict[int, list[Message]] = {0: [], 1: []}
    for message in sorted(consumed, key=lambda m: (m.partition(), m.offset())):
        by_partition[message.partition()].append(message)
    assert [m.offset() for m in by_partition[0]] == list(range(PER_PARTITION))
    return by_partition


def finished(batch: Batch) -> bool:
    tickets = list(batch.tickets.values())
    assert tickets
    states = {t.finished for t in tickets}
    assert len(states) == 1, "a batch is done as a whole"
    return states.pop()


def test_a_message_with_no_items_settles_at_once(messages):
    batch = OffsetTracker().track(messages[0][:1])
    tracker = SinkTracker()
    (entry,) = tracker.open(batch)
    assert entry.message is batch.messages[0] and entry.key == (entry.message.topic(), 0)
    assert tracker.expect(entry, 0) is True
    assert entry.settled and entry.failure is None and not entry.finished
    assert not finished(batch) and tracker.open_messages() == 1
    tracker.complete(entry)
    assert entry.finished and finished(batch) and tracker.open_messages() == 0


def test_items_are_reported_and_the_first_failure_is_kept(messages):
    batch = OffsetTracker().track(messages[0][:1])
    tracker = SinkTracker()
    (entry,) = tracker.open(batch)
    assert tracker.expect(entry, 4) is False and not entry.settled
    assert tracker.report(entry, DELIVERED) is False
    assert tracker.report(entry, PERMANENT) is False
    assert tracker.report(entry, EXHAUSTED) is False
    assert entry.remaining == 1 and entry.failure is PERMANENT
    assert tracker.report(entry, DELIVERED) is True  # the last item settles it
    assert entry.settled and entry.failure is PERMANENT and not entry.finished
    assert not finished(batch)  # settled is not completed: its dead letter is not acknowledged yet


def test_all_delivered_settles_without_a_failure(messages):
    batch = OffsetTracker().track(messages[1][:1])
    tracker = SinkTracker()
    (entry,) = tracker.open(batch)
    tracker.expect(entry, 2)
    assert [tracker.report(entry, DELIVERED) for _ in range(2)] == [False, True]
    assert entry.failure is None and entry.settled


def test_report_settles_each_message_exactly_once(messages):
    batch = OffsetTracker().track(messages[0] + messages[1])
    tracker = SinkTracker()
    entries = tracker.open(batch)
    counts = [1, 2, 3, 1, 2, 3, 1, 2]
    for entry, count in zip(entries, counts, strict=True):
        assert tracker.expect(entry, count) is False
    settled = []
    # Interleaved reports, then more than each message expects (a duplicate or stray report).
    for round_ in range(4):
        for entry in entries:
            if tracker.report(entry, EXHAUSTED if round_ == 1 else DELIVERED):
                settled.append(entry)
    assert sorted(map(id, settled)) == sorted(map(id, entries)), "each message settles once"
    assert all(e.remaining == 0 for e in entries)
    assert [e.failure for e in entries] == [None if c == 1 else EXHAUSTED for c in counts]


def test_withdrawn_changes_nothing(messages):
    batch = OffsetTracker().track(messages[0][:2])
    tracker = SinkTracker()
    first, second = tracker.open(batch)
    tracker.expect(first, 1)
    tracker.expect(second, 2)
    assert tracker.report(first, REVOKED) is False
    assert tracker.report(second, PERMANENT) is False
    assert tracker.report(second, REVOKED) is False
    assert (first.remaining, first.settled, first.failure) == (1, False, None)
    assert (second.remaining, second.settled, second.failure) == (1, False, PERMANENT)
    assert not finished(batch) and tracker.open_messages() == 2


def test_fail_settles_a_message_that_sent_nothing(messages):
    batch = OffsetTracker().track(messages[1][:1])
    tracker = SinkTracker()
    (entry,) = tracker.open(batch)
    invalid = Failed(Kind.INVALID, "cannot decode the record", 0)
    tracker.fail(entry, invalid)
    assert entry.settled and entry.failure is invalid and entry.remaining == 0
    assert tracker.report(entry, DELIVERED) is False  # nothing was sent: a report changes nothing
    tracker.complete(entry)
    assert finished(batch)


def test_a_batch_is_done_only_when_every_message_is_complete(messages):
    offsets = OffsetTracker()
    batch = offsets.track(messages[0] + messages[1])
    tracker = SinkTracker()
    entries = tracker.open(batch)
    assert tracker.open_messages() == 2 * PER_PARTITION
    for entry in entries:
        tracker.expect(entry, 1)
    # Completing one message twice must not count twice towards its batch.
    tracker.complete(entries[0])
    tracker.complete(entries[0])
    for entry in entries[1:-1]:
        tracker.report(entry, DELIVERED)
        tracker.complete(entry)
        assert not finished(batch)
        assert offsets.pop_committable() == {}
    assert tracker.open_messages() == 1
    tracker.report(entries[-1], DELIVERED)
    tracker.complete(entries[-1])
    assert finished(batch) and tracker.open_messages() == 0
    topic = entries[0].key[0]
    assert offsets.pop_committable() == {(topic, 0): PER_PARTITION, (topic, 1): PER_PARTITION}


def test_batches_finish_independently(messages):
    offsets = OffsetTracker()
    tracker = SinkTracker()
    first = offsets.track(messages[0][:2])
    second = offsets.track(messages[0][2:])
    first_entries, second_entries = tracker.open(first), tracker.open(second)
    for entry in second_entries:
        tracker.expect(entry, 0)
        tracker.complete(entry)
    assert finished(second) and not finished(first)
    assert offsets.pop_committable() == {}  # the first batch of the partition is not done yet
    for entry in first_entries:
        tracker.expect(entry, 0)
        tracker.complete(entry)
    assert finished(first)
    assert offsets.pop_committable() == {(first_entries[0].key[0], 0): PER_PARTITION}


def test_withdraw_completes_open_messages_of_revoked_partitions(messages):
    offsets = OffsetTracker()
    batch = offsets.track(messages[0] + messages[1])
    tracker = SinkTracker()
    entries = tracker.open(batch)
    topic = entries[0].key[0]
    lost = [e for e in entries if e.key == (topic, 0)]
    kept = [e for e in entries if e.key == (topic, 1)]
    for entry in entries:
        tracker.expect(entry, 2)
    tracker.report(lost[0], PERMANENT)  # a failure that must not be dead-lettered by the old owner
    for entry in kept:
        for _ in range(2):
            tracker.report(entry, DELIVERED)
    for entry in kept[:-1]:
        tracker.complete(entry)

    assert tracker.withdraw([(topic, 0)]) == PER_PARTITION
    assert all(e.finished and e.failure is None for e in lost)
    assert tracker.open_messages() == 1 and not finished(batch)
    assert tracker.withdraw([(topic, 0)]) == 0  # nothing left to withdraw
    tracker.complete(kept[-1])
    assert finished(batch)  # the kept partition's messages finish their batch
    offsets.forget([(topic, 0)])  # as the loop does for a revoked partition
    assert offsets.pop_committable() == {(topic, 1): PER_PARTITION}


def test_reports_after_withdraw_are_ignored(messages):
    batch = OffsetTracker().track(messages[0][:1] + messages[1][:1])
    tracker = SinkTracker()
    gone, kept = tracker.open(batch)
    tracker.expect(gone, 2)
    tracker.expect(kept, 1)
    tracker.withdraw([gone.key])
    assert tracker.report(gone, DELIVERED) is False
    assert tracker.report(gone, EXHAUSTED) is False
    assert tracker.report(gone, REVOKED) is False
    assert gone.failure is None and gone.remaining == 2
    tracker.complete(gone)  # e.g. a late dead-letter acknowledgement: the batch must not count it twice
    assert not finished(batch)
    assert tracker.report(kept, DELIVERED) is True
    tracker.complete(kept)
    assert finished(batch)


def test_withdraw_of_a_partition_with_nothing_open_changes_nothing(messages):
    batch = OffsetTracker().track(messages[1][:2])
    tracker = SinkTracker()
    entries = tracker.open(batch)
    assert tracker.withdraw([(entries[0].key[0], 0)]) == 0
    assert tracker.open_messages() == 2 and not finished(batch)
