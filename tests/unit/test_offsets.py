from confluent_kafka import Message

from worker.kafka.offsets import OffsetTracker


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
