"""Identity stitching: the wait line as pure code (a fake clock, no sleeps), then the normaliser's
strategy around it on a real broker (its producer, real raw messages, a fake clock for the line)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from confluent_kafka import Message
from prometheus_client import REGISTRY

from tests.kafka_helpers import read_count, settings_for, settle, setup_topics
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.kafka.offsets import OffsetTracker
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.normalize.stitching import WaitLine
from worker.normalize.strategy import NormaliseStrategy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- the wait line --------------------------------------------------------------------------------


def test_an_item_waits_until_its_deadline_then_leaves(clock):
    line: WaitLine[str] = WaitLine(2000, clock=clock)
    assert line.hold("a1", "page") == []
    assert "a1" in line and len(line) == 1 and line.next_deadline() == 102.0
    clock.advance(1.999)
    assert line.due() == []
    clock.advance(0.001)
    assert line.due() == [("a1", ["page"])]
    assert "a1" not in line and len(line) == 0 and line.next_deadline() is None


def test_a_link_releases_every_item_of_its_anonymous_id_in_order_and_only_those(clock):
    line: WaitLine[str] = WaitLine(2000, clock=clock)
    line.hold("a1", "first")
    clock.advance(0.5)
    line.hold("a2", "someone else")
    line.hold("a1", "second")
    line.hold("a1", "group", own_wait=False)
    assert line.release("a1") == ["first", "second", "group"]
    assert line.release("a1") == [] and len(line) == 1 and "a2" in line
    clock.advance(2)
    assert line.due() == [("a2", ["someone else"])]


def test_items_behind_keep_their_own_wait_and_place_keepers_leave_with_the_head(clock):
    line: WaitLine[str] = WaitLine(2000, clock=clock)
    line.hold("a1", "first")
    line.hold("a1", "keeps its place", own_wait=False)
    clock.advance(1)
    line.hold("a1", "second")  # waits until 103
    line.hold("a1", "behind the second", own_wait=False)
    clock.advance(1)
    assert line.due() == [("a1", ["first", "keeps its place"])]
    assert len(line) == 2 and line.next_deadline() == 103.0
    clock.advance(1)
    assert line.due() == [("a1", ["second", "behind the second"])]
    assert len(line) == 0


def test_a_place_keeper_with_nothing_ahead_of_it_leaves_at_once(clock):
    line: WaitLine[str] = WaitLine(2000, clock=clock)
    assert line.hold("a1", "group", own_wait=False) == [("a1", ["group"])]
    assert len(line) == 0 and "a1" not in line


def test_when_full_the_oldest_waiting_item_leaves_with_what_queues_behind_it(clock):
    line: WaitLine[str] = WaitLine(2000, max_waiting=3, clock=clock)
    line.hold("a1", "oldest")
    line.hold("a1", "behind", own_wait=False)
    clock.advance(0.1)
    line.hold("a2", "second")
    assert line.hold("a3", "third") == [("a1", ["oldest", "behind"])]
    assert len(line) == 2 and "a1" not in line
    assert line.hold("a4", "fourth") == []
    assert line.hold("a5", "fifth") == [("a2", ["second"])]
    assert len(line) == 3


def test_eviction_skips_items_already_released_by_a_link(clock):
    line: WaitLine[str] = WaitLine(2000, max_waiting=2, clock=clock)
    line.hold("a1", "linked")
    line.hold("a2", "waits")
    assert line.release("a1") == ["linked"]
    line.hold("a3", "new")
    assert line.hold("a4", "newer") == [("a2", ["waits"])]
    clock.advance(5)
    assert sorted(line.due()) == [("a3", ["new"]), ("a4", ["newer"])]


def test_drop_removes_selected_items_and_frees_place_keepers_left_at_a_head(clock):
    line: WaitLine[tuple[int, str]] = WaitLine(2000, clock=clock)
    line.hold("a1", (0, "revoked"))
    line.hold("a1", (1, "kept, keeps its place"), own_wait=False)
    line.hold("a1", (1, "kept, waits"))
    line.hold("a2", (0, "revoked too"))
    line.hold("a3", (1, "untouched"))
    dropped, released = line.drop(lambda item: item[0] == 0)
    assert dropped == [(0, "revoked"), (0, "revoked too")]
    assert released == [("a1", [(1, "kept, keeps its place")])]
    assert len(line) == 2 and "a2" not in line
    assert line.release("a1") == [(1, "kept, waits")]
    clock.advance(2)
    assert line.due() == [("a3", [(1, "untouched")])]


def test_release_all_empties_the_line_keeping_each_order(clock):
    line: WaitLine[str] = WaitLine(2000, clock=clock)
    line.hold("a1", "1a")
    line.hold("a2", "2a")
    line.hold("a1", "1b")
    assert sorted(line.release_all()) == [("a1", ["1a", "1b"]), ("a2", ["2a"])]
    assert len(line) == 0 and line.next_deadline() is None and line.due() == []


def test_a_line_needs_a_wait():
    with pytest.raises(ValueError):
        WaitLine(0)


# -- the strategy around it, on a real broker ----------------------------------------------------

CODEC = EventCodec()
DESTINATIONS = ["amplitude", "amberflo"]


@pytest.fixture
def config(broker, prefix) -> Config:
    # fetch.wait.max.ms: the embedded broker answers a fetch only when it runs out (ARCHITECTURE.md gap 7).
    config = settings_for(
        broker, prefix, partitions=2, DESTINATIONS=",".join(DESTINATIONS), KAFKA_FETCH_WAIT_MAX_MS="10"
    )
    setup_topics(config)
    return config


class Rig:
    """A NormaliseStrategy fed raw messages from the broker, batch by batch, the loop's way."""

    def __init__(self, config: Config, clock: Clock, wait_ms: int = 2000, max_waiting: int = 100) -> None:
        self.config = config
        self.identities = IdentityMap(1000)
        normaliser = Normaliser(DESTINATIONS, self.identities, [])
        line: WaitLine | None = WaitLine(wait_ms, max_waiting, clock=clock) if wait_ms else None
        self.strategy = NormaliseStrategy(config.kafka, config.names, DESTINATIONS, normaliser, line=line)
        self.tracker = OffsetTracker()
        self.raw = config.names.raw
        self.next_offset = {0: 0, 1: 0}
        self.producer = config.kafka.producer()

    def submit(self, *payloads: tuple[int, dict]) -> None:
        """Write (partition, event or envelope) pairs to raw, read them back, submit them as one batch
        in the order given."""
        producer = self.producer
        coordinates = []
        for partition, payload in payloads:
            producer.produce(self.raw, orjson.dumps(payload), "k", partition=partition)
            coordinates.append((partition, self.next_offset[partition]))
            self.next_offset[partition] += 1
        assert producer.flush(10) == 0
        by_coordinates: dict[tuple[int, int], Message] = {
            (m.partition(), m.offset()): m for m in read_count(self.config, "raw", sum(self.next_offset.values()))
        }
        self.strategy.submit(self.tracker.track([by_coordinates[c] for c in coordinates]))

    def committable(self) -> dict[int, int]:
        """What may be committed once every write so far is acknowledged (the strategy confirms
        a batch's writes on a later loop turn: poll as the loop does, until the queue is empty)."""
        for _ in range(200):
            self.strategy.poll()
            if len(self.strategy.producer) == 0:
                self.strategy.poll()
                break
            self.strategy.producer.poll(0.01)
        return {p: o for (_t, p), o in self.tracker.pop_committable().items()}

    def poll_until_committable(self, tries: int = 200) -> dict[int, int]:
        """Poll as the loop does until some batch finishes (its writes acknowledged)."""
        for _ in range(tries):
            self.strategy.poll()
            if ready := self.committable():
                return ready
            self.strategy.producer.poll(0.01)
        return {}

    def out(self, destination: str) -> dict[str, list[tuple[str, str | None]]]:
        """(messageId, userId) of everything on the destination's topic, per key in order (the
        order a key's partition keeps); checks each key is the event's userId, else anonymousId."""
        per_key: dict[str, list[tuple[str, str | None]]] = {}
        for message in settle(self.config, f"dest.{destination}", timeout=1.0):
            event = CODEC.decode(message.value())[0]
            key = message.key().decode()
            assert key == (event.get("userId") or event["anonymousId"])
            per_key.setdefault(key, []).append((event["messageId"], event.get("userId")))
        return per_key


@pytest.fixture
def rig(config, clock) -> Iterator[Rig]:
    rig = Rig(config, clock)
    yield rig
    rig.strategy.close()


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def page(anonymous_id: str, message_id: str) -> dict:
    return {"type": "page", "anonymousId": anonymous_id, "name": "Home", "messageId": message_id}


def identify(anonymous_id: str, user_id: str, message_id: str) -> dict:
    return {"type": "identify", "anonymousId": anonymous_id, "userId": user_id, "messageId": message_id}


def test_a_later_identify_releases_the_waiting_event_stitched_before_itself(rig):
    stitched_before = counter("segment_worker_stitched_total")
    rig.submit((0, page("a1", "page-1")))
    assert len(rig.strategy.line) == 1
    assert rig.committable() == {}, "a waiting event keeps its batch open"
    rig.submit(
        (1, identify("a1", "u1", "identify-1")),
        (1, {"type": "track", "userId": "u2", "event": "E", "messageId": "other"}),
    )
    assert len(rig.strategy.line) == 0
    assert rig.committable() == {0: 1, 1: 2}
    # Keyed by the person now, like their other events, and before the identify that named them.
    assert rig.out("amberflo") == {"u1": [("page-1", "u1"), ("identify-1", "u1")], "u2": [("other", "u2")]}
    # Amplitude takes anonymous events (it merges a device's history itself): it got the page at once.
    assert rig.out("amplitude") == {
        "a1": [("page-1", None)],
        "u1": [("identify-1", "u1")],
        "u2": [("other", "u2")],
    }
    assert counter("segment_worker_stitched_total") == stitched_before + 1


def test_an_event_whose_wait_runs_out_goes_unstitched_and_is_counted(rig, clock):
    before = counter("segment_worker_unstitched_total", destination="amberflo")
    rig.submit((0, page("a1", "page-1")))
    rig.strategy.poll()
    assert len(rig.strategy.line) == 1 and counter("segment_worker_stitch_waiting_events") == 1
    clock.advance(2.0)
    assert rig.poll_until_committable() == {0: 1}
    assert len(rig.strategy.line) == 0 and counter("segment_worker_stitch_waiting_events") == 0
    assert rig.out("amberflo") == {"a1": [("page-1", None)]}
    assert counter("segment_worker_unstitched_total", destination="amberflo") == before + 1


def test_a_link_from_the_identities_topic_releases_at_the_next_poll(rig):
    rig.submit((0, page("a1", "page-1")))
    rig.identities.put("a1", "u1")  # as the reader thread does with another instance's identify
    assert rig.poll_until_committable() == {0: 1}
    assert rig.out("amberflo") == {"u1": [("page-1", "u1")]}


def test_later_events_of_a_waiting_person_queue_behind_and_others_pass(rig, clock):
    rig.submit(
        (0, page("a1", "page-1")),
        (0, {"type": "group", "anonymousId": "a1", "groupId": "g", "messageId": "group-1"}),
        (0, {"type": "track", "userId": "u9", "anonymousId": "a9", "event": "E", "messageId": "known"}),
    )
    assert len(rig.strategy.line) == 2  # the group needs no userId, but keeps its place behind the page
    clock.advance(1.0)
    rig.submit((1, page("a1", "page-2")))
    assert len(rig.strategy.line) == 3
    clock.advance(1.0)
    rig.strategy.poll()  # page-1's wait is over: it leaves, with the group behind it; page-2 waits on
    assert len(rig.strategy.line) == 1
    assert rig.poll_until_committable() == {0: 3}
    rig.submit((1, identify("a1", "u1", "identify-1")))
    assert rig.committable() == {1: 2}
    assert rig.out("amberflo") == {
        "u9": [("known", "u9")],
        "a1": [("page-1", None), ("group-1", None)],
        "u1": [("page-2", "u1"), ("identify-1", "u1")],
    }


def test_a_link_later_in_the_same_payload_stitches_the_event_without_waiting(rig):
    envelope = {"batch": [page("a1", "page-1"), identify("a1", "u1", "identify-1")]}
    rig.submit((0, envelope))
    assert len(rig.strategy.line) == 0 and rig.committable() == {0: 1}
    assert rig.out("amberflo") == {"u1": [("page-1", "u1"), ("identify-1", "u1")]}


def test_an_alias_releases_its_previous_id(rig):
    rig.submit((0, page("a1", "page-1")))
    rig.submit((1, {"type": "alias", "previousId": "a1", "userId": "u1", "messageId": "alias-1"}))
    assert len(rig.strategy.line) == 0 and rig.committable() == {0: 1, 1: 1}
    assert rig.out("amberflo") == {"u1": [("page-1", "u1"), ("alias-1", "u1")]}


def test_revoke_drops_waiting_events_of_revoked_partitions_and_lets_the_rest_finish(rig):
    rig.submit((0, page("a1", "revoked")), (1, page("a2", "kept")))
    raw = rig.raw
    rig.strategy.revoke([(raw, 0)])
    rig.tracker.forget([(raw, 0)])  # as the loop does right after
    assert len(rig.strategy.line) == 1 and "a2" in rig.strategy.line
    assert rig.committable() == {}, "the kept partition's event still waits"
    rig.identities.put("a2", "u2")
    assert rig.poll_until_committable() == {1: 1}
    assert rig.out("amberflo") == {"u2": [("kept", "u2")]}  # the revoked one is its new owner's to redo


def test_drain_releases_what_is_left_with_whatever_is_known(rig):
    rig.submit((0, page("a1", "linked")), (1, page("a2", "never linked")))
    rig.identities.put("a1", "u1")
    rig.strategy.drain(0.0)  # no time left: everything goes now
    assert len(rig.strategy.line) == 0
    assert rig.committable() == {0: 1, 1: 1}
    assert rig.out("amberflo") == {"u1": [("linked", "u1")], "a2": [("never linked", None)]}


def test_when_the_line_is_full_the_oldest_goes_unstitched(config, clock):
    rig = Rig(config, clock, max_waiting=2)
    try:
        rig.submit((0, page("a1", "oldest")), (0, page("a2", "second")), (0, page("a3", "third")))
        assert len(rig.strategy.line) == 2
        assert rig.out("amberflo") == {"a1": [("oldest", None)]}
    finally:
        rig.strategy.close()


def test_with_the_wait_disabled_anonymous_events_go_at_once_and_are_counted(config, clock):
    before = counter("segment_worker_unstitched_total", destination="amberflo")
    rig = Rig(config, clock, wait_ms=0)
    try:
        assert rig.strategy.line is None
        group = {"type": "group", "anonymousId": "a1", "groupId": "g", "messageId": "group-1"}
        rig.submit((0, page("a1", "page-1")), (0, group))
        assert rig.committable() == {0: 2}
        assert rig.out("amberflo") == {"a1": [("page-1", None), ("group-1", None)]}
        # Counted for the page only: Amberflo skips a group whatever the ids.
        assert counter("segment_worker_unstitched_total", destination="amberflo") == before + 1
    finally:
        rig.strategy.close()
