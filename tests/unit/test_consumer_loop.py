"""ConsumerLoop in process against a real broker, with a recording test Strategy.

The strategy is the loop's collaborator written for the test: it records every call, and the test
decides when a batch is done (by a rule, or by a command the strategy runs on the loop's thread,
as `Strategy.submit` requires). Committed offsets are read back from the broker by a fresh consumer
of the same group that never joins it (`committed()` only).

The `broker` fixture runs each test on the embedded Tansu and on Apache Kafka. Tansu joins a group in
about half of session.timeout.ms, so its groups here use 2000/200 ms (`for_broker`); on both,
membership changes one member at a time, only once the group is stable (Tansu wedges a group that a
member leaves mid-rebalance).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Producer as RdProducer
from confluent_kafka import TopicPartition
from prometheus_client import REGISTRY

from tests.kafka_helpers import settings_for
from worker.config import Config
from worker.kafka.admin import TopicSpec, create_topics
from worker.kafka.consumer_loop import Backpressure, ConsumerLoop
from worker.kafka.offsets import Batch, TopicPartitionKey

# The loop's rebalance handling is broker behaviour: run on both brokers.
BOTH_BROKERS = True

pytestmark = pytest.mark.integration

ROLE = "loop"
QUICK_COMMITS = {"auto.commit.interval.ms": "200"}
# Only the loop's own synchronous commits (revoke, shutdown) reach the broker within a test.
NO_AUTO_COMMITS = {"auto.commit.interval.ms": "600000"}

Coordinate = tuple[int, int]  # (partition, offset)


# -- helpers --------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def holds(predicate: Callable[[], bool], duration: float, what: str) -> None:
    """`predicate` holds every time it is checked for `duration` seconds."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate(), what
        time.sleep(0.05)
    assert predicate(), what


def for_broker(broker, overrides: dict[str, str]) -> dict[str, str]:
    """`overrides` plus the group timing the broker under test needs: Tansu joins a group in about half
    the session timeout and answers fetches only when fetch.wait.max.ms runs out; Apache Kafka keeps
    the settings users get."""
    if getattr(broker, "kind", "embedded") == "embedded":
        return {"session.timeout.ms": "2000", "heartbeat.interval.ms": "200", "fetch.wait.max.ms": "10", **overrides}
    return dict(overrides)


def make_loop(
    broker, config: Config, topic: str, strategy: Recorder, overrides: dict[str, str], **options
) -> ConsumerLoop:
    return ConsumerLoop(
        config.kafka, ROLE, [topic], strategy, poll_timeout=0.1, overrides=for_broker(broker, overrides), **options
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def coordinates(batch: Batch) -> list[Coordinate]:
    return [(m.partition(), m.offset()) for m in batch.messages]


def new_topic(broker, prefix: str, partitions: int) -> tuple[Config, str]:
    config = settings_for(broker, prefix, partitions=partitions)
    topic = config.names.full_topic("loop")
    assert create_topics(config.kafka.admin(), [TopicSpec(topic, partitions, {})]) == {topic: "created"}
    return config, topic


def produce_to(config: Config, topic: str, per_partition: dict[int, int], start: int = 0) -> None:
    """Write `per_partition[p]` messages to each partition p (values "p<p>-<i>") and wait for the acks."""
    producer = config.kafka.producer()
    failures: list[str] = []
    for partition, count in per_partition.items():
        for i in range(start, start + count):
            producer.produce(
                topic,
                f"p{partition}-{i}".encode(),
                f"k{i}",
                lambda err, _m: failures.append(str(err)) if err else None,
                partition=partition,
            )
    assert producer.flush(15) == 0 and not failures, failures


class Committed:
    """The group's committed offsets, as a new owner would see them (None: nothing committed)."""

    def __init__(self, config: Config, topic: str, partitions: int) -> None:
        self.consumer = config.kafka.consumer(ROLE, {"enable.auto.commit": "false"})
        self.partitions = [TopicPartition(topic, p) for p in range(partitions)]

    def __call__(self) -> dict[int, int | None]:
        found = self.consumer.committed(self.partitions, timeout=10)
        return {tp.partition: tp.offset if tp.offset >= 0 else None for tp in found}

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def committed_reader() -> Iterator[Callable[[Config, str, int], Committed]]:
    readers: list[Committed] = []

    def make(config: Config, topic: str, partitions: int) -> Committed:
        readers.append(Committed(config, topic, partitions))
        return readers[-1]

    yield make
    for reader in readers:
        reader.close()


def done_prefix(accepted: list[Batch], done: set[int], partitions: int) -> dict[int, int | None]:
    """The reference model: per partition, the offset after the last message of the done prefix of
    the batches touching it (None when the first such batch is not done)."""
    expected: dict[int, int | None] = {}
    for partition in range(partitions):
        value = None
        for batch in accepted:
            offsets = [o for p, o in coordinates(batch) if p == partition]
            if not offsets:
                continue
            if id(batch) not in done:
                break
            value = max(offsets) + 1
        expected[partition] = value
    return expected


class Recorder:
    """A test Strategy: records every call; a batch is done when `finish(batch)` says so at submit,
    when the test marks it (`mark_done`, run on the loop's thread), or at drain if `drain_finishes`."""

    def __init__(self, finish: Callable[[Batch], bool] = lambda _batch: False) -> None:
        self.lock = threading.Lock()
        self.finish = finish
        self.refuse = threading.Event()  # while set, submit raises Backpressure
        self.refuse_after_first = False  # start refusing once the first batch is taken
        self.drain_finishes: Callable[[Batch], bool] = lambda _batch: False
        self.drain_waits = False  # drain waits out its timeout (nothing finishes: a destination that is down)
        self.block: dict[int, float] = {}  # submit number (0 = the first accepted) -> seconds it blocks the loop
        self.on_refused: Callable[[], None] = lambda: None  # runs on the loop's thread before each refusal
        self.offers: list[list[Coordinate]] = []  # every submit call, refused ones included
        self.accepted: list[Batch] = []
        self.done: list[Batch] = []
        self.done_after: list[int] = []  # for each done batch, how many revokes came before it
        self.pending: list[Batch] = []  # accepted, not done, not revoked
        self.revoked: list[set[TopicPartitionKey]] = []
        self.calls: list[str] = []
        self.drain_timeouts: list[float] = []
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()

    # the Strategy protocol, called on the loop's thread

    def submit(self, batch: Batch) -> None:
        with self.lock:
            self.offers.append(coordinates(batch))
            if self.refuse.is_set():
                self.on_refused()
                raise Backpressure
            self.accepted.append(batch)
            self.pending.append(batch)
            if self.refuse_after_first:
                self.refuse_after_first = False
                self.refuse.set()
            blocking = self.block.pop(len(self.accepted) - 1, 0.0)
        if blocking:
            time.sleep(blocking)  # a stuck destination: the loop's thread cannot poll
        if self.finish(batch):
            self._done(batch)

    def poll(self) -> None:
        while True:
            try:
                command, ran = self._commands.get_nowait()
            except queue.Empty:
                return
            command()
            ran.set()

    def drain(self, timeout: float) -> None:
        self.calls.append("drain")
        self.drain_timeouts.append(timeout)
        self.poll()
        for batch in list(self.pending):
            if self.drain_finishes(batch):
                self._done(batch)
        deadline = time.monotonic() + timeout
        while self.drain_waits and self.pending and time.monotonic() < deadline:
            time.sleep(0.05)

    def revoke(self, partitions: list[TopicPartitionKey]) -> None:
        gone = set(partitions)
        with self.lock:
            self.calls.append("revoke")
            self.revoked.append(gone)
            # Unfinished work of those partitions is dropped: their new owner redoes it.
            self.pending = [b for b in self.pending if not any(k in gone for k in b.tickets)]

    def close(self) -> None:
        self.calls.append("close")

    # the test's side

    def _done(self, batch: Batch) -> None:
        with self.lock:
            if batch in self.pending:
                self.pending.remove(batch)
            self.done.append(batch)
            self.done_after.append(len(self.revoked))
        batch.done()

    def mark_done(self, batch: Batch, timeout: float = 5.0) -> None:
        """Call `batch.done()` on the loop's thread (from its next `poll`) and wait until it ran."""
        ran = threading.Event()
        self._commands.put((lambda: self._done(batch), ran))
        assert ran.wait(timeout), "the loop did not poll its strategy"

    def accepted_coordinates(self) -> list[Coordinate]:
        with self.lock:
            return [c for batch in self.accepted for c in coordinates(batch)]

    def done_coordinates(self, revokes: int = 0) -> list[Coordinate]:
        """What was finished after at least `revokes` revokes."""
        with self.lock:
            return [c for b, n in zip(self.done, self.done_after, strict=True) if n >= revokes for c in coordinates(b)]

    def snapshot(self) -> tuple[list[Batch], list[list[Coordinate]]]:
        with self.lock:
            return list(self.accepted), list(self.offers)


class Running:
    """A ConsumerLoop's `run()` on a thread of its own."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="consumer-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:
            self.error = exc

    def assigned(self) -> frozenset[TopicPartitionKey]:
        return frozenset(self.loop.assignment)

    def stop(self, timeout: float = 20.0) -> None:
        self.loop.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return after stop()"
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def running(loop: ConsumerLoop) -> Iterator[Running]:
    handle = Running(loop)
    try:
        yield handle
    finally:
        if handle.thread.is_alive():
            handle.stop()
        elif handle.error is not None:
            raise AssertionError("run() failed") from handle.error


def all_partitions(topic: str, count: int) -> frozenset[TopicPartitionKey]:
    return frozenset((topic, p) for p in range(count))


# -- tests ----------------------------------------------------------------------------------------


def test_batches_arrive_in_partition_order_and_only_the_done_prefix_is_committed(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 2)
    produce_to(config, topic, {0: 6, 1: 6})
    strategy = Recorder()
    loop = make_loop(broker, config, topic, strategy, QUICK_COMMITS, batch_size=3)
    committed = committed_reader(config, topic, 2)
    with running(loop) as handle:
        wait_for(lambda: len(strategy.accepted_coordinates()) == 12, 15, "all 12 messages submitted")
        seen = strategy.accepted_coordinates()
        for partition in (0, 1):
            values = [m.value() for b in strategy.accepted for m in b.messages if m.partition() == partition]
            assert [o for p, o in seen if p == partition] == list(range(6))
            assert values == [f"p{partition}-{i}".encode() for i in range(6)]
        assert all(len(b.messages) <= 3 for b in strategy.accepted)

        # Nothing is done, so nothing is committed (for several auto-commit intervals).
        holds(lambda: committed() == {0: None, 1: None}, 1.0, "committed before any batch was done")

        accepted, done = list(strategy.accepted), set()
        touching_0 = [b for b in accepted if any(p == 0 for p, _ in coordinates(b))]
        assert len(touching_0) >= 2
        first, second = touching_0[0], touching_0[1]

        def finish(batch: Batch) -> dict[int, int | None]:
            strategy.mark_done(batch)
            done.add(id(batch))
            expected = done_prefix(accepted, done, 2)
            wait_for(lambda: committed() == expected, 5, f"committed {expected}, have {committed()}")
            holds(lambda: committed() == expected, 0.6, "committed offsets moved past the done prefix")
            return expected

        # The second batch of partition 0 done first: partition 0 commits nothing until the first is done.
        assert finish(second)[0] is None
        assert finish(first)[0] == max(o for p, o in coordinates(second) if p == 0) + 1
        for batch in accepted:
            if id(batch) not in done:
                finish(batch)
        assert committed() == {0: 6, 1: 6}
        assert handle.assigned() == all_partitions(topic, 2)


def test_backpressure_pauses_and_offers_the_refused_batch_again_in_order(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 1)
    produce_to(config, topic, {0: 8})
    strategy = Recorder(finish=lambda _batch: True)
    strategy.refuse_after_first = True
    loop = make_loop(broker, config, topic, strategy, QUICK_COMMITS, batch_size=2)
    held: list[int] = []  # the highest offset the loop holds for the strategy, at each refusal
    strategy.on_refused = lambda: held.append(max((m.offset() for b in loop._carry for m in b.messages), default=-1))
    committed = committed_reader(config, topic, 1)
    with running(loop):
        wait_for(lambda: len(strategy.snapshot()[1]) >= 6, 15, "the refused batch offered again several times")
        accepted, offers = strategy.snapshot()
        assert len(accepted) == 1 and coordinates(accepted[0])[0] == (0, 0)
        refused = offers[1]
        assert refused[0] == (0, len(coordinates(accepted[0])))  # the very next message
        assert all(offer == refused for offer in offers[1:]), "a later batch overtook the refused one"
        assert metric("segment_worker_paused_partitions") == 1

        # While refused: no new batch is taken, and the paused partition fetches nothing new.
        produce_to(config, topic, {0: 4}, start=8)
        holds(lambda: len(strategy.snapshot()[0]) == 1, 1.5, "a batch was taken while the strategy refused")
        _, offers = strategy.snapshot()
        assert all(offer == refused for offer in offers[1:])
        assert max(held) < 8, "the paused partition fetched messages written after the pause"

        strategy.refuse.clear()
        wait_for(lambda: len(strategy.accepted_coordinates()) >= 12, 10, "all 12 messages taken after resuming")
        holds(lambda: len(strategy.accepted_coordinates()) == 12, 0.5, "a message was taken twice")
        assert strategy.accepted_coordinates() == [(0, i) for i in range(12)]  # nothing lost, duplicated or reordered
        values = [m.value() for b in strategy.accepted for m in b.messages]
        assert values == [f"p0-{i}".encode() for i in range(12)]
        assert metric("segment_worker_paused_partitions") == 0
        wait_for(lambda: committed() == {0: 12}, 5, "everything committed after resuming")


def test_a_joining_member_takes_partitions_after_the_first_commits_what_is_done(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 4)
    produce_to(config, topic, dict.fromkeys(range(4), 5))
    everything = all_partitions(topic, 4)
    committed = committed_reader(config, topic, 4)

    # The first member finishes offsets 0-2 of every partition at once and keeps 3-4 in flight; asked
    # to drain (on revoke) it finishes 3, not 4; after its first revoke it finishes everything at once.
    first = Recorder()
    first.finish = lambda batch: bool(first.revoked) or all(o < 3 for _, o in coordinates(batch))
    first.drain_finishes = lambda batch: all(o == 3 for _, o in coordinates(batch))
    second = Recorder(finish=lambda _batch: True)
    revokes_before = metric("segment_worker_commits_total", reason="revoke")
    loop_a = make_loop(broker, config, topic, first, NO_AUTO_COMMITS, batch_size=1)
    loop_b = make_loop(broker, config, topic, second, QUICK_COMMITS, batch_size=1)
    with running(loop_a) as a:
        wait_for(lambda: a.assigned() == everything, 15, "the first member assigned every partition")
        wait_for(lambda: len(first.accepted_coordinates()) == 20, 10, "the first member took all 20 messages")
        assert sorted(first.done_coordinates()) == [(p, o) for p in range(4) for o in range(3)]
        assert committed() == dict.fromkeys(range(4))  # done and stored, but no commit has happened yet

        with running(loop_b) as b:
            wait_for(
                lambda: b.assigned() and a.assigned() | b.assigned() == everything and not a.assigned() & b.assigned(),
                20,
                "the group shared out between both members",
            )
            taken = {p for _, p in b.assigned()}
            assert first.revoked and {(topic, p) for p in taken} <= first.revoked[0]
            assert metric("segment_worker_commits_total", reason="revoke") > revokes_before
            # What the first finished (offset 3 while draining) was committed before it let go: the
            # second member starts after it, and redoes only what was unfinished.
            wait_for(
                lambda: set(second.done_coordinates()) >= {(p, 4) for p in taken},
                10,
                "the second member redid the unfinished messages of its partitions",
            )
            assert {o for _, o in second.accepted_coordinates()} == {4}
            wait_for(lambda: all(committed()[p] == 5 for p in taken), 5, "the second member committed its partitions")
            stable = a.assigned()
            b.stop()  # one member at a time, the group being stable
        wait_for(lambda: a.assigned() == everything, 20, "the first member got every partition back")
        assert len(first.revoked) == 2 and first.revoked[1] == set(stable)

    done = first.done_coordinates() + second.done_coordinates()
    assert sorted(done) == [(p, o) for p in range(4) for o in range(5)], "each message done exactly once"
    assert committed() == dict.fromkeys(range(4), 5), "a committed gap"


def test_partitions_lost_after_max_poll_interval_are_revoked_and_nothing_is_committed(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 2)
    produce_to(config, topic, {0: 4, 1: 4})
    everything = all_partitions(topic, 2)
    committed = committed_reader(config, topic, 2)
    # The first batch is done (its offsets stored, not yet committed: no auto-commit within the test);
    # the second is never finished, and its submit holds the loop's thread past max.poll.interval.ms.
    strategy = Recorder()
    strategy.finish = lambda batch: len(strategy.accepted) < 2 or batch is not strategy.accepted[1]
    lost_before = metric("segment_worker_rebalances_total", kind="lost")
    revoked_before = metric("segment_worker_rebalances_total", kind="revoke")
    # Lost for real: the loop does not poll for longer than max.poll.interval.ms (which may not be
    # below session.timeout.ms, and Apache Kafka accepts no session timeout below 6 s).
    if getattr(broker, "kind", "embedded") == "embedded":
        timing, stuck_for = {"max.poll.interval.ms": "3000"}, 5.0
    else:
        timing = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500", "max.poll.interval.ms": "6000"}
        stuck_for = 8.0
    strategy.block = {1: stuck_for}
    loop = make_loop(broker, config, topic, strategy, {**NO_AUTO_COMMITS, **timing}, batch_size=3)
    with running(loop) as handle:
        wait_for(lambda: len(strategy.snapshot()[0]) >= 2, 15, "the second batch submitted")
        assert handle.assigned() == everything
        done_first, stuck_batch = strategy.snapshot()[0][:2]
        assert done_first in strategy.done
        wait_for(lambda: strategy.revoked, 10, "revoke after the partitions were lost")
        assert strategy.revoked[0] == set(everything)
        assert metric("segment_worker_rebalances_total", kind="lost") == lost_before + 1
        assert metric("segment_worker_rebalances_total", kind="revoke") == revoked_before  # not the revoke path
        # Lost: someone else may own them already, so not even the done first batch is committed.
        holds(lambda: committed() == {0: None, 1: None}, 1.0, "committed after the partitions were lost")

        # The group is joined again; everything comes back (nothing was committed) and is finished once.
        wait_for(lambda: handle.assigned() == everything, 15, "assigned again after the loss")
        every = [(p, o) for p in range(2) for o in range(4)]
        wait_for(lambda: sorted(strategy.done_coordinates(revokes=1)) == every, 15, "everything done after rejoining")
        assert stuck_batch not in strategy.done and stuck_batch not in strategy.pending
        assert committed() == {0: None, 1: None}
    assert committed() == {0: 4, 1: 4}  # committed at shutdown


def test_stop_drains_commits_what_is_done_and_closes(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 2)
    produce_to(config, topic, {0: 5, 1: 5})
    committed = committed_reader(config, topic, 2)
    strategy = Recorder()
    # Drain finishes every batch but the last one taken: that one stays unfinished (a drain timeout).
    strategy.drain_finishes = lambda batch: batch is not strategy.accepted[-1]
    shutdowns_before = metric("segment_worker_commits_total", reason="shutdown")
    loop = make_loop(broker, config, topic, strategy, NO_AUTO_COMMITS, batch_size=3, drain_timeout=7.5)
    handle = Running(loop)
    try:
        wait_for(lambda: len(strategy.accepted_coordinates()) == 10, 15, "all 10 messages submitted")
        holds(lambda: committed() == {0: None, 1: None}, 0.5, "committed before anything was done")
        assert strategy.calls == []
    finally:
        started = time.monotonic()
        handle.stop()
    assert time.monotonic() - started < 10
    assert strategy.calls[:1] == ["drain"] and strategy.calls[-1:] == ["close"]
    assert strategy.calls.count("close") == 1
    assert strategy.drain_timeouts[0] == 7.5
    assert metric("segment_worker_commits_total", reason="shutdown") == shutdowns_before + 1
    accepted = strategy.accepted
    expected = done_prefix(accepted, {id(b) for b in accepted[:-1]}, 2)
    assert committed() == expected
    assert expected != {0: 5, 1: 5}  # the unfinished last batch holds back its partition(s)


def test_run_returns_when_until_holds_and_commits_at_shutdown(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 1)
    produce_to(config, topic, {0: 4})
    strategy = Recorder(finish=lambda _batch: True)
    loop = make_loop(broker, config, topic, strategy, NO_AUTO_COMMITS, batch_size=10)
    deadline = time.monotonic() + 20
    loop.run(until=lambda: len(strategy.accepted_coordinates()) == 4 or time.monotonic() > deadline)
    assert strategy.accepted_coordinates() == [(0, i) for i in range(4)]
    assert strategy.calls[0] == "drain" and strategy.calls[-1] == "close"
    assert committed_reader(config, topic, 1)() == {0: 4}


def test_partitions_kept_through_a_cooperative_revoke_are_not_left_paused(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 2)
    produce_to(config, topic, {0: 2})  # only partition 0 has data: the refused batch is partition 0's
    everything = all_partitions(topic, 2)
    # Any librdkafka property reaches the consumer through KAFKA_*; cooperative-sticky revokes only
    # the partitions that move, so the loop keeps the others across the rebalance.
    cooperative = {**QUICK_COMMITS, "partition.assignment.strategy": "cooperative-sticky"}
    first = Recorder(finish=lambda _batch: True)
    first.refuse_after_first = True
    second = Recorder(finish=lambda _batch: True)
    with running(make_loop(broker, config, topic, first, cooperative, batch_size=1)) as a:
        wait_for(lambda: a.assigned() == everything, 15, "the first member assigned both partitions")
        wait_for(lambda: len(first.snapshot()[1]) >= 3, 10, "the strategy refusing (partitions paused)")
        assert metric("segment_worker_paused_partitions") == 2
        with running(make_loop(broker, config, topic, second, cooperative, batch_size=1)) as b:
            wait_for(
                lambda: b.assigned() and a.assigned() | b.assigned() == everything and not a.assigned() & b.assigned(),
                20,
                "the group shared out between both members",
            )
            kept = sorted(p for _, p in a.assigned())
            assert first.revoked and len(first.revoked[0]) == 1  # incremental: only the moved partition
            # librdkafka's sticky assignor has moved partition 0, the refused batch's, every time: that
            # empties the carry, and the partition kept must then fetch again.
            first.refuse.clear()  # the destination works again
            produce_to(config, topic, {0: 3, 1: 3}, start=10)
            ends = {0: 5, 1: 3}  # partition 0 held 2 messages before these
            wanted = {(p, o) for p in kept for o in range(ends[p])}
            wait_for(
                lambda: set(first.accepted_coordinates()) >= wanted,
                8,
                f"the first member consuming its kept partitions {kept} again",
            )
            b.stop()
        wait_for(lambda: a.assigned() == everything, 20, "the first member got every partition back")


def test_a_drain_that_times_out_is_not_repeated_at_shutdown(broker, prefix, committed_reader):
    config, topic = new_topic(broker, prefix, 1)
    produce_to(config, topic, {0: 3})
    strategy = Recorder()  # nothing is ever finished: a destination that is down
    strategy.drain_waits = True  # as SinkStrategy.drain does while nothing finishes
    loop = make_loop(broker, config, topic, strategy, NO_AUTO_COMMITS, batch_size=10, drain_timeout=2.0)
    handle = Running(loop)
    wait_for(lambda: len(strategy.accepted_coordinates()) == 3, 30, "all 3 messages submitted")
    started = time.monotonic()
    handle.stop()
    elapsed = time.monotonic() - started
    assert committed_reader(config, topic, 1)() == {0: None}  # nothing done, nothing committed
    assert strategy.calls.count("drain") == 1 and elapsed < 3.0, (
        f"drained {strategy.calls.count('drain')}x in {elapsed:.1f}s"
    )


@pytest.mark.parametrize(
    ("committed_at", "consumed"),
    [(1, [1, 2, 4, 5, 6]), (3, [4, 5, 6])],
    ids=["a-marker-inside-the-assignment", "an-assignment-starting-at-a-marker"],
)
def test_offsets_the_consumer_never_saw_are_counted(broker, prefix, committed_at, consumed):
    """A committed transaction leaves its marker at an offset no consumer is given: a real gap of
    one, like those a compacted topic or a broker that skips records makes. Seen within an
    assignment, or as an assignment whose first record is not at the group's committed offset."""
    config, topic = new_topic(broker, prefix, 1)
    transactional = {"transactional.id": f"{prefix}-gaps", "message.timeout.ms": "30000"}
    producer = RdProducer(config.kafka.producer_config(transactional))
    producer.init_transactions(15)
    for transaction in range(2):
        producer.begin_transaction()
        for i in range(3):
            producer.produce(topic, f"t{transaction}-{i}".encode(), partition=0)
        producer.commit_transaction(15)  # offsets 0-2, a marker at 3; 4-6, a marker at 7
    committer = config.kafka.consumer(ROLE, {"enable.auto.commit": "false"})
    committer.commit(offsets=[TopicPartition(topic, 0, committed_at)], asynchronous=False)
    committer.close()
    strategy = Recorder(finish=lambda _batch: True)
    loop = make_loop(broker, config, topic, strategy, QUICK_COMMITS, batch_size=2)
    with running(loop):
        wait_for(lambda: len(strategy.accepted_coordinates()) == len(consumed), 15, f"offsets {consumed}")
    assert strategy.accepted_coordinates() == [(0, offset) for offset in consumed]
    assert metric("segment_worker_offset_gaps_total", topic=topic) == 1
    assert metric("segment_worker_offsets_skipped_total", topic=topic) == 1
    assert metric("segment_worker_offsets_recovered_total", topic=topic) == 0  # read again, still a gap


def test_records_the_consumer_was_not_given_are_read_again_before_anything_after_them(broker, prefix, committed_reader):
    """A consumer that jumps forward within a partition, as one does when the broker answers its
    fetch with a later record batch than the one asked for (here the test moves it on, once, at the
    first batch): the loop reads the partition again from the first offset it was not given, hands
    on every record once and in order, and commits all of them."""
    config, topic = new_topic(broker, prefix, 1)
    produce_to(config, topic, {0: 40})
    jumped_from: list[int] = []

    def jump_once(batch: Batch) -> bool:
        if not jumped_from:
            jumped_from.append(batch.messages[-1].offset())
            assert loop._consumer is not None
            loop._consumer.seek(TopicPartition(topic, 0, jumped_from[0] + 11))
        return True

    strategy = Recorder(finish=jump_once)
    loop = make_loop(broker, config, topic, strategy, QUICK_COMMITS, batch_size=5)
    committed = committed_reader(config, topic, 1)
    with running(loop):
        wait_for(lambda: len(strategy.accepted_coordinates()) >= 40, 15, "40 records submitted")
        wait_for(lambda: committed() == {0: 40}, 10, f"all 40 committed, have {committed()}")
    assert strategy.accepted_coordinates() == [(0, offset) for offset in range(40)]
    assert metric("segment_worker_offsets_recovered_total", topic=topic) == 10
    assert metric("segment_worker_offsets_skipped_total", topic=topic) == 0
