"""One person's events arrive in order: SDK-style clients send batches mixing many users through the
collector (`segment-worker collect`), two normaliser processes share a six-partition raw topic, and
on the destination topic every user's events come out complete and in the order they were sent.

This holds only because the collector writes each event under its own user's key: were a batch
written whole under its first event's user, one user's events would sit on several raw partitions,
which the two normalisers (and even one, across partitions) write out in no particular order.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests

from tests.integration.test_collector import CollectorProcess
from tests.kafka_helpers import read, role_env, settings_for, setup_topics, start_role
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.kafka.broker import LoopbackBroker
from worker.processes import Role

pytestmark = pytest.mark.integration
# Keys and the murmur2 partitioner are the clients' (checked against Java's on both brokers in
# test_collector_keys.py): the first broker chosen is enough for the order end to end.
FIRST_BROKER_ONLY = True

KEY = "wk_order"
PARTITIONS = 6
USERS = 20
EVENTS_PER_USER = 15
SENDERS = 4  # app servers, each with its own users, sending at the same time
BATCH_SIZE = 7  # not a divisor of anything above, so batches start with ever other users
CODEC = EventCodec()


def user(number: int) -> dict[str, str]:
    """Every fifth user is anonymous: keyed by anonymousId, the other branch of the key."""
    return {"anonymousId": f"anon-{number:02d}"} if number % 5 == 4 else {"userId": f"user-{number:02d}"}


def person(event: dict) -> str:
    return event.get("userId") or event["anonymousId"]


def traffic(seed: int) -> list[list[dict]]:
    """Each sender's batches: its users' events interleaved at random, each user's in sequence."""
    rng = random.Random(seed)
    senders = []
    for sender in range(SENDERS):
        sent = dict.fromkeys(range(sender, USERS, SENDERS), 0)
        stream = []
        while waiting := [number for number, count in sent.items() if count < EVENTS_PER_USER]:
            number = rng.choice(waiting)
            sent[number] += 1
            stream.append(
                {
                    "type": "track",
                    **user(number),
                    "event": "Step Completed",
                    "messageId": f"{number}-{sent[number]}",
                    "properties": {"seq": sent[number]},
                }
            )
        senders.append(
            [
                {
                    "batch": stream[start : start + BATCH_SIZE],
                    "context": {"library": {"name": "order-test", "version": "1"}},
                    "sentAt": "2024-05-01T12:00:00.000Z",
                }
                for start in range(0, len(stream), BATCH_SIZE)
            ]
        )
    return senders


def send(url: str, batches: list[dict], statuses: list[int]) -> None:
    """As an SDK does: one batch at a time, the next only once the last was acknowledged."""
    with requests.Session() as session:
        for batch in batches:
            statuses.append(session.post(f"{url}/v1/batch", json=batch, auth=(KEY, ""), timeout=30).status_code)


def owned(role: Role) -> set[int]:
    """The raw partitions a normaliser holds now, from its "partitions assigned/revoked" log lines."""
    held: set[int] = set()
    assert role.log_path is not None
    for line in role.log_path.read_text(errors="replace").splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # librdkafka's own lines
        if isinstance(record, dict) and record.get("event") in ("partitions assigned", "partitions revoked"):
            partitions = {int(name.rsplit("[", 1)[1].rstrip("]")) for name in record["partitions"]}
            held = held | partitions if record["event"] == "partitions assigned" else held - partitions
    return held


def wait_until_shared(first: Role, second: Role, timeout: float = 30.0) -> None:
    """Until both hold partitions and together all of them: traffic then goes to two writers at
    once. (The embedded broker wedges a group that changes while it rebalances: docs/ARCHITECTURE.md.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a, b = owned(first), owned(second)
        if a and b and not a & b and a | b == set(range(PARTITIONS)):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"the normalisers did not share the partitions in {timeout} s: {owned(first)}, {owned(second)}"
    )


@pytest.fixture
def settings(broker: LoopbackBroker, prefix: str) -> Config:
    settings = settings_for(broker, prefix, partitions=PARTITIONS, DESTINATIONS="amplitude")
    setup_topics(settings)
    return settings


@pytest.fixture
def normalisers(settings: Config, tmp_path: Path) -> Iterator[tuple[Role, Role]]:
    first = start_role(settings, ["normalize"], tmp_path)
    second: Role | None = None
    try:
        deadline = time.monotonic() + 30
        while owned(first) != set(range(PARTITIONS)) and time.monotonic() < deadline:
            assert first.alive(), first.log_path.read_text() if first.log_path else ""
            time.sleep(0.1)
        second = start_role(settings, ["normalize"], tmp_path)  # only once the group is stable
        wait_until_shared(first, second)
        yield first, second
    finally:
        codes = [role.terminate() for role in (first, second) if role is not None]
        assert codes == [0] * len(codes)


def test_each_users_events_reach_the_destination_topic_complete_and_in_order(
    settings: Config, normalisers: tuple[Role, Role], tmp_path: Path
) -> None:
    collector = CollectorProcess(role_env(settings, COLLECTOR_WRITE_KEYS=KEY), tmp_path / "collect.log")
    try:
        statuses: list[list[int]] = [[] for _ in range(SENDERS)]
        threads = [
            threading.Thread(target=send, args=(collector.url, batches, statuses[sender]))
            for sender, batches in enumerate(traffic(seed=10))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        assert collector.terminate() == 0, collector.log_path.read_text()
    assert all(status == 200 for sent in statuses for status in sent), statuses

    total = USERS * EVENTS_PER_USER
    messages = read(settings, "dest.amplitude", lambda seen: len(seen) >= total, timeout=40)
    by_person: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for message in messages:
        event, _extra = CODEC.decode(message.value())
        assert message.key() == person(event).encode()
        by_person[person(event)].append((message.partition(), message.offset(), event["properties"]["seq"]))
    assert len(by_person) == USERS
    # Each user's events on one partition, so their offsets say the order they were written in.
    split = {who: sorted({p for p, _o, _s in placed}) for who, placed in by_person.items()}
    assert {who: partitions for who, partitions in split.items() if len(partitions) > 1} == {}
    out_of_order = {
        who: seqs
        for who, placed in sorted(by_person.items())
        if (seqs := [seq for _p, _o, seq in sorted(placed)]) != list(range(1, EVENTS_PER_USER + 1))
    }
    assert out_of_order == {}, f"{len(out_of_order)} of {USERS} users' events out of order or missing: {out_of_order}"
    # Both normalisers had some of the users to write: the order held with two writers at once.
    used = {message.partition() for message in read(settings, "raw", lambda seen: len(seen) >= total, timeout=20)}
    first, second = normalisers
    assert used & owned(first) and used & owned(second), (used, owned(first), owned(second))
