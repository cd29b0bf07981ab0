"""One person's events reach each destination in the order they were consumed, through failures
and rebalances (SINK_PER_USER_ORDER, on by default). Real sink processes, real broker, real HTTP
to the stand-ins.

- Brevo and Amplitude failing a third of their requests (500, seeded): one user's 60 identifies
  end with the contact (Brevo) holding the 60th value, and that user's accepted events arrive in
  order, none inverted; the other users' events all arrive too.
- A rebalance while a sink is retrying: the first member's destination hangs, so it has a request
  under way and every item it holds to retry when a second member joins; after the rebalance the first member never
  delivers an item of a partition it gave up, even once its destination is back.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Any

import pytest

from tests.kafka_helpers import read_count, settings_for, setup_topics
from tests.sink_helpers import (
    Standins,
    assigned_partitions,
    log_has,
    start_sink,
    track_events,
    wait_until,
    write_events,
)

pytestmark = pytest.mark.integration
# What is tested is the sink's own rule, not the broker's behaviour: the first broker chosen is enough.
FIRST_BROKER_ONLY = True

ORDERED_USER = "u-order"
SEQUENCE = re.compile(r"s(\d{5})")  # the stream position written into each messageId


def ordered_user_events(updates: int = 60, tracks: int = 20, others: int = 120) -> list[dict[str, Any]]:
    """`updates` identifies of ORDERED_USER (firstName v00, v01, ...) and `tracks` tracks of theirs,
    interleaved with `others` tracks of ten other users; messageId "s<position>" is the position."""
    background = iter(track_events(others, users=10))
    mine = [("identify", i) for i in range(updates)] + [("track", i) for i in range(tracks)]
    mine.sort(key=lambda kind_index: kind_index[1] / (updates if kind_index[0] == "identify" else tracks))
    events: list[dict[str, Any]] = []
    for kind, index in mine:
        events.extend(next(background) for _ in range(others // len(mine)))
        template = track_events(1, users=1)[0]
        event = {**template, "userId": ORDERED_USER, "anonymousId": f"anon-{ORDERED_USER}", "type": kind}
        if kind == "identify":
            event.pop("event")
            event.pop("properties")
            event["traits"] = {"email": f"{ORDERED_USER}@example.com", "firstName": f"v{index:02d}"}
        events.append(event)
    events.extend(background)
    for position, event in enumerate(events):
        event["messageId"] = f"s{position:05d}"
    return events


def positions_of(keys: list[str]) -> list[int]:
    return [int(match.group(1)) for key in keys if (match := SEQUENCE.search(key))]


def inversions(sequence: list[int]) -> int:
    return sum(1 for before, after in itertools.pairwise(sequence) if after < before)


def settled_received(standins: Standins, destination: str, quiet: float = 2.0, timeout: float = 60.0) -> dict:
    """What the stand-in holds once it has not changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    seen = standins.received(destination)
    since = time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.2)
        now = standins.received(destination)
        if now != seen:
            seen, since = now, time.monotonic()
    return seen


@pytest.fixture
def settings(broker, prefix):
    settings = settings_for(broker, prefix, partitions=3)
    setup_topics(settings)
    return settings


@pytest.mark.parametrize("destination", ["brevo", "amplitude"])
def test_a_third_of_requests_failing_keeps_one_users_updates_in_order(settings, clean_standins, destination, tmp_path):
    standins = clean_standins
    events = ordered_user_events()
    standins.faults(destination, error_rate=1 / 3, seed=7)
    sink = start_sink(settings, destination, standins, tmp_path)
    try:
        # Written in small pieces while the sink runs, so the user's events span many requests (and
        # Amplitude's batches) whose failures and retries interleave.
        for start in range(0, len(events), 20):
            write_events(settings, destination, events[start : start + 20])
            time.sleep(0.1)
        # Brevo: identifies are upserts of one contact, tracks are events.
        expected = sum(1 for e in events if e["type"] == "track") + 1 if destination == "brevo" else len(events)
        standins.wait_received(destination, expected, timeout=90)
        received = settled_received(standins, destination)  # the contact's later updates too
        assert sink.alive()
    finally:
        assert sink.terminate() == 0
    assert len(received) == expected
    statuses = standins.stats(destination)["statuses"]
    assert sum(n for status, n in statuses.items() if status.startswith("5")) >= 8, f"no failures: {statuses}"
    mine = [key for key, item in received.items() if ORDERED_USER in json.dumps(item)]
    assert inversions(positions_of(mine)) == 0, f"{ORDERED_USER}'s accepted events out of order: {mine}"
    if destination == "brevo":
        contact = received[f"contact:{ORDERED_USER}@example.com"]
        assert contact["attributes"]["FIRSTNAME"] == "v59"  # the latest update is the one kept
    else:
        identifies = [item for item in received.values() if item.get("event_type") == "$identify"]
        mine_set = [i["user_properties"]["$set"]["firstName"] for i in identifies if i.get("user_id") == ORDERED_USER]
        assert mine_set[-1] == "v59" and mine_set == sorted(mine_set)


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_after_a_rebalance_during_retries_nothing_is_delivered_for_a_partition_given_up(
    broker, prefix, clean_standins, assignor, tmp_path
):
    settings = settings_for(broker, prefix, partitions=4, KAFKA_PARTITION_ASSIGNMENT_STRATEGY=assignor)
    setup_topics(settings)
    for directory in ("second", "first", "second-sink"):
        (tmp_path / directory).mkdir()
    first_standins, second_standins = clean_standins, Standins(tmp_path / "second")
    destination = "amplitude"
    events = track_events(200, users=40)
    write_events(settings, destination, events)
    partition_of = {(m.key() or b"").decode(): m.partition() for m in read_count(settings, f"dest.{destination}", 200)}
    # The first member's destination hangs (each request times out after SINK_REQUEST_TIMEOUT), so
    # whenever the rebalance comes it has a request under way and everything it holds to retry.
    first_standins.faults(destination, timeout_rate=1.0, timeout_seconds=30.0)
    first = start_sink(settings, destination, first_standins, tmp_path / "first", SINK_REQUEST_TIMEOUT="2")
    second = None
    try:
        wait_until(lambda: first_standins.stats(destination)["requests"] >= 2, 30, "the first member retrying")
        second = start_sink(settings, destination, second_standins, tmp_path / "second-sink")
        wait_until(lambda: assigned_partitions(second.log_path), 60, "the second member assigned partitions")
        wait_until(lambda: log_has(first.log_path, "partitions revoked"), 30, "the first member's revoke")
        given_up = assigned_partitions(second.log_path)
        kept = assigned_partitions(first.log_path)
        assert given_up and not given_up & kept
        theirs = {e["messageId"] for e in events if partition_of[e["userId"]] in given_up}
        second_standins.wait_received(destination, len(theirs), timeout=60)
        time.sleep(1.0)  # the first member's retries, were any left, would go on meanwhile
        first_standins.faults(destination)  # its destination is back
        everything = len(events)
        wait_until(
            lambda: (
                len(set(first_standins.received(destination)) | set(second_standins.received(destination)))
                >= everything
            ),
            60,
            "every event delivered by one member or the other",
        )
        time.sleep(1.0)
        late = set(first_standins.received(destination)) & theirs
        assert late == set(), f"the first member delivered {len(late)} items of partitions it gave up"
        assert first.alive() and second.alive()
    finally:
        if second is not None:
            second.terminate()
        first.terminate()
        second_standins.stop()
