from confluent_kafka import Message

from worker.kafka.offsets import Gap, OffsetTracker


def messages(*coordinates):
    return [Message(topic=t, partition=p, offset=o) for t, p, o in coordinates]


def test_only_the_done_prefix_of_batches_is_committable_per_partition():
    tracker = OffsetTracker()
    first = tracker.track(messages(("t", 0, 10), ("t", 0, 11), ("t", 1, 5)))
    second = tracker.track(messages(("t", 0, 12), ("t", 1, 6)))
    third = tracker.track(messages(("t", 0, 13)))
    second.done()
    assert tracker.pop_committable() == {}  # the first batch is not done, so nothing after it may be committed
    first.done()
    assert tracker.pop_committable() == {("t", 0): 13, ("t", 1): 7}
    assert tracker.pop_committable() == {}
    assert tracker.pending() == 1
    third.done()
    assert tracker.pop_committable() == {("t", 0): 14}


def test_forget_drops_a_partition_and_without_trims_a_batch():
    tracker = OffsetTracker()
    batch = tracker.track(messages(("t", 0, 1), ("t", 1, 1)))
    tracker.forget([("t", 0)])
    kept = batch.without({("t", 0)})
    assert [m.partition() for m in kept.messages] == [1] and list(kept.tickets) == [("t", 1)]
    assert batch.without({("t", 0), ("t", 1)}) is None
    kept.done()
    assert tracker.pop_committable() == {("t", 1): 2} and tracker.pending() == 0


def test_a_jump_forward_within_a_partition_is_a_gap_and_a_re_read_is_not():
    tracker = OffsetTracker()
    tracker.track(messages(("t", 0, 10), ("t", 0, 11), ("t", 1, 3)))
    assert tracker.gaps == []  # nothing to compare a first batch with, and it is contiguous
    tracker.track(messages(("t", 0, 12), ("t", 1, 4), ("t", 0, 15), ("t", 0, 16), ("t", 1, 9)))
    assert tracker.gaps == [Gap(("t", 0), 13, 15), Gap(("t", 1), 5, 9)]
    tracker.gaps.clear()
    tracker.track(messages(("t", 0, 17), ("t", 1, 7), ("t", 1, 8), ("t", 1, 9)))  # 1: read again from 7
    assert tracker.gaps == []
    tracker.track(messages(("t", 1, 11)))  # the next batch still follows on from the last offset seen
    assert tracker.gaps == [Gap(("t", 1), 10, 11)]


def test_an_assignment_that_does_not_start_at_its_committed_offset_is_a_gap():
    tracker = OffsetTracker()
    tracker.expect(("t", 0), 100)
    tracker.expect(("t", 1), 7)
    tracker.expect(("t", 2), None)  # nothing committed: auto.offset.reset decides where it starts
    tracker.track(messages(("t", 0, 100), ("t", 1, 12), ("t", 2, 50)))
    assert tracker.gaps == [Gap(("t", 1), 7, 12)]


def test_a_forgotten_partition_is_not_compared_with_its_old_offsets():
    tracker = OffsetTracker()
    tracker.track(messages(("t", 0, 10)))
    tracker.forget([("t", 0)])
    tracker.track(messages(("t", 0, 40)))  # another owner went on meanwhile
    assert tracker.gaps == []
