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


class Seeks:
    """The loop's side of a re-read: records each gap it was asked to read again."""

    def __init__(self, works: bool = True) -> None:
        self.works = works
        self.asked: list[Gap] = []

    def __call__(self, gap: Gap) -> bool:
        self.asked.append(gap)
        return self.works


def offsets(batch):
    return [(m.partition(), m.offset()) for m in batch.messages]


def test_a_gap_is_read_again_and_nothing_after_it_is_handed_on_until_it_is_filled():
    seeks = Seeks()
    tracker = OffsetTracker(seeks, rereads=3)
    tracker.track(messages(("t", 0, 10), ("t", 1, 3))).done()
    skipped = tracker.track(messages(("t", 0, 11), ("t", 1, 4), ("t", 0, 15), ("t", 0, 16), ("t", 1, 5)))
    assert seeks.asked == [Gap(("t", 0), 12, 15)]
    assert offsets(skipped) == [(0, 11), (1, 4), (1, 5)]  # 15 and 16 come again, after 12-14
    assert tracker.gaps == [] and tracker.recovered == []
    filled = tracker.track(messages(("t", 0, 12), ("t", 0, 13), ("t", 0, 14), ("t", 0, 15)))
    assert offsets(filled) == [(0, 12), (0, 13), (0, 14), (0, 15)]
    assert [(r.gap, r.attempts) for r in tracker.recovered] == [(Gap(("t", 0), 12, 15), 1)]
    assert tracker.gaps == []
    skipped.done()
    assert tracker.pop_committable() == {("t", 0): 12, ("t", 1): 6}  # nothing past the gap is committable


def test_a_gap_every_re_read_shows_again_is_the_logs_own_and_is_kept_after_the_last_re_read():
    seeks = Seeks()
    tracker = OffsetTracker(seeks, rereads=2)
    tracker.track(messages(("t", 0, 3))).done()  # a marker at 4, say
    assert offsets(tracker.track(messages(("t", 0, 5), ("t", 0, 6)))) == []
    assert offsets(tracker.track(messages(("t", 0, 5)))) == []  # the re-read shows the same gap
    kept = tracker.track(messages(("t", 0, 5), ("t", 0, 6)))
    assert offsets(kept) == [(0, 5), (0, 6)]
    assert seeks.asked == [Gap(("t", 0), 4, 5)] * 2
    assert tracker.gaps == [Gap(("t", 0), 4, 5)] and tracker.recovered == []
    kept.done()
    assert tracker.pop_committable() == {("t", 0): 7}
    tracker.gaps.clear()
    # A later gap has re-reads of its own.
    assert offsets(tracker.track(messages(("t", 0, 7), ("t", 0, 9)))) == [(0, 7)]
    assert seeks.asked[-1] == Gap(("t", 0), 8, 9)


def test_a_filled_gap_followed_by_another_counts_the_first_as_filled_and_reads_the_second_again():
    seeks = Seeks()
    tracker = OffsetTracker(seeks)
    tracker.track(messages(("t", 0, 0)))
    tracker.track(messages(("t", 0, 5)))
    batch = tracker.track(messages(("t", 0, 1), ("t", 0, 2), ("t", 0, 8)))
    assert offsets(batch) == [(0, 1), (0, 2)]
    assert [r.gap for r in tracker.recovered] == [Gap(("t", 0), 1, 5)]
    assert seeks.asked == [Gap(("t", 0), 1, 5), Gap(("t", 0), 3, 8)]


def test_a_gap_that_cannot_be_read_again_is_kept_at_once_and_its_batch_is_whole():
    seeks = Seeks(works=False)
    tracker = OffsetTracker(seeks)
    tracker.track(messages(("t", 0, 1)))
    batch = tracker.track(messages(("t", 0, 4)))
    assert offsets(batch) == [(0, 4)] and tracker.gaps == [Gap(("t", 0), 2, 4)]


def test_a_reassigned_partition_forgets_the_gap_it_was_reading_again():
    seeks = Seeks()
    tracker = OffsetTracker(seeks)
    tracker.track(messages(("t", 0, 1)))
    tracker.track(messages(("t", 0, 4)))
    tracker.forget([("t", 0)])
    tracker.expect(("t", 0), 30)
    tracker.track(messages(("t", 0, 30)))
    assert tracker.recovered == [] and tracker.gaps == [] and len(seeks.asked) == 1
