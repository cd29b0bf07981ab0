from worker.kafka.offsets import OffsetTracker


def test_only_the_done_prefix_is_committable_per_partition():
    tracker = OffsetTracker()
    a = [tracker.track("t", 0, offset) for offset in (10, 11, 12)]
    b = tracker.track("t", 1, 5)
    a[1].done()
    b.done()
    assert tracker.committable() == {("t", 1): 6}  # offset 10 not done, so 11 cannot be committed
    a[0].done()
    assert tracker.committable() == {("t", 0): 12}
    assert tracker.committable() == {}
    assert tracker.pending() == 1
    a[2].done()
    assert tracker.committable() == {("t", 0): 13}


def test_forget_drops_a_partition():
    tracker = OffsetTracker()
    ticket = tracker.track("t", 0, 1)
    tracker.forget([("t", 0)])
    ticket.done()
    assert tracker.committable() == {} and tracker.pending() == 0
