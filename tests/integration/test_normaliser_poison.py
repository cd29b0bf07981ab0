"""Poison on segment.raw never stops the normaliser group, and missing messageIds are one per call.

Two `segment-worker normalize` processes share the group while a mixed stream goes through them:
every class of record that once crashed a normaliser (and so, in turn, every member of its group),
hypothesis-generated payloads and bytes, and good events. Both stay up; every good event reaches
dest.amplitude; every poison record is on dlq.raw with its reason; identical calls without a
messageId get distinct ids; and a restart from offset 0 under a new consumer group (reprocessing)
writes exactly the same ids again.

What each generated payload must produce is computed by the in-process pipeline at the record's
real coordinates (read back from segment.raw); tests/unit/test_normaliser_fuzz.py checks that
pipeline's own properties. Here the processes must write exactly that, no more and no less.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.kafka_helpers import produce, read, read_count, settings_for, settle, setup_topics, start_role
from tests.unit.test_normaliser_fuzz import payloads
from worker.avro_codec import EventCodec
from worker.dlq.headers import header_map
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.normalize.user_agent import UserAgentEnricher

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Generating overly large repr")]
CODEC = EventCodec()
GENERATED = 30  # of each kind: JSON-ish payloads, and bytes


def track(**fields) -> dict:
    return {"type": "track", "userId": "u-good", "event": "Fine", **fields}


def nest(depth: int) -> bytes:
    return b"[" * depth + b"null" + b"]" * depth


def deep_event(properties_depth: int, **fields) -> bytes:
    """A track event whose properties nest `properties_depth` levels: the event is one more."""
    head = orjson.dumps(track(**fields))[:-1]
    return head + b',"properties":{"a":' + nest(properties_depth - 1) + b"}}"


# Under the producer's and the broker's 1,000,000 bytes with its key, over them with dead-letter headers.
NEAR_LIMIT_BYTES = 999_500


def sized_event(size: int) -> bytes:
    empty = orjson.dumps(track(properties={"blob": ""}))
    return orjson.dumps(track(properties={"blob": "x" * (size - len(empty))}))


# The classes of record that crashed the normaliser, by name, and what the reason must say.
POISON: dict[str, tuple[bytes, str]] = {
    "superscript digits": (orjson.dumps(track(timestamp="2026-11-22T10:00:00.\u00b2\u00b2\u00b2Z")), "ISO-8601"),
    "arabic-indic digits": (
        orjson.dumps(track(receivedAt="2026-11-22T10:00:00.\u0661\u0662\u0663Z")),
        "ISO-8601",
    ),
    "offset before year 1": (orjson.dumps(track(timestamp="0001-01-01T00:00:00+01:00")), "0001-9999"),
    "skew past year 9999": (
        orjson.dumps(track(timestamp="9999-12-31T00:00:00Z", sentAt="0001-01-01T00:00:00Z")),
        "clock skew",
    ),
    "nested past the encoder": (deep_event(300), "nested 301 levels deep; the limit is 254"),
    "deep batch contexts": (
        b'{"batch":[{"type":"track","userId":"u","event":"E","context":'
        + b'{"a":' * 1000
        + b"1"
        + b"}" * 1000
        + b'}],"context":'
        + b'{"a":' * 1000
        + b"1"
        + b"}" * 1000
        + b"}",
        "batch `context`",
    ),
    # Over the 500 KB batch limit, and close enough to the broker's message limit that its dead
    # letter (the same bytes plus headers) would be too large to produce: the writer truncates it.
    "near the message-size limit": (sized_event(NEAR_LIMIT_BYTES), "the limit is 512000 bytes a batch"),
}
# A batch whose middle item is poison: only that item is dead-lettered.
MIXED_BATCH = orjson.dumps(
    {"batch": [track(messageId="good-batch-0"), {"type": "track", "userId": "u"}, track(messageId="good-batch-2")]}
)
GOOD: dict[str, bytes] = {
    **{f"good-{i}": orjson.dumps(track(messageId=f"good-{i}", properties={"i": i})) for i in range(10)},
    # These crashed the normaliser before; they are fine events.
    "good-nul-ip": orjson.dumps(track(messageId="good-nul-ip", context={"ip": "81.2.69.142\u0000"})),
    "good-week-date": orjson.dumps(track(messageId="good-week-date", timestamp="2026-W47-7T10:00:00.000Z")),
    "good-at-the-limit": deep_event(253, event="At The Limit"),  # 254 levels, and no messageId: one derived
}
GOOD_IDS = {f"good-{i}" for i in range(10)} | {"good-nul-ip", "good-week-date", "good-batch-0", "good-batch-2"}
TWIN = orjson.dumps(track(userId="u-twin", event="Twin Billed", properties={"units": 1}))  # no messageId
TWIN_BATCH = orjson.dumps({"batch": [track(userId="u-twin", event="Twin Batch Billed")] * 2})


def generated() -> list[bytes]:
    """Hypothesis payloads, the same every run (derandomized), drawn through a real @given."""
    drawn: list[bytes] = []

    @settings(
        max_examples=GENERATED,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(payloads, st.binary(min_size=1, max_size=200)))
    def draw(value: bytes) -> None:
        drawn.append(value)

    draw()
    return drawn


def records() -> list[tuple[str, bytes]]:
    items: list[tuple[str, bytes]] = [(f"poison-{name}", value) for name, (value, _reason) in POISON.items()]
    items += list(GOOD.items())
    items += [("mixed-batch", MIXED_BATCH), ("twin", TWIN), ("twin", TWIN), ("twin-batch", TWIN_BATCH)]
    items += [(f"generated-{i}", value) for i, value in enumerate(generated())]
    # Interleave poison and good, so every partition sees both.
    return sorted(items, key=lambda item: zlib.crc32(item[0].encode()) % 7)


def expectations(raw_messages) -> tuple[set[str], set[tuple[str, str | None, str]]]:
    """messageIds on dest.amplitude and (key, batch_index, error) on dlq.raw, per the pipeline at
    each record's real coordinates."""
    normaliser = Normaliser(["amplitude"], IdentityMap(10_000), [GeoEnricher(), UserAgentEnricher()])
    ids: set[str] = set()
    dead: set[tuple[str, str | None, str]] = set()
    for message in raw_messages:
        _kind, timestamp_ms = message.timestamp()
        result = normaliser.process(
            message.value(), timestamp_ms, message.topic(), message.partition(), message.offset()
        )
        ids |= {r.event["messageId"] for r in result.routed}
        key = message.key().decode()
        dead |= {(key, None if r.index is None else str(r.index), r.reason[:1000]) for r in result.rejected}
    return ids, dead


def message_ids(messages) -> set[str]:
    return {CODEC.decode(m.value())[0]["messageId"] for m in messages}


def dead_letters(messages) -> set[tuple[str, str | None, str]]:
    out = set()
    for message in messages:
        headers = header_map(message.headers())
        out.add((message.key().decode(), headers.get("batch_index"), headers["error"]))
    return out


def wait_for_assignment(role, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "partitions assigned" in role.log_path.read_text():
            return
        assert role.alive(), role.log_path.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no partitions assigned within {timeout} s:\n{role.log_path.read_text()[-3000:]}")


@pytest.fixture
def config(broker, prefix):
    config = settings_for(broker, prefix, partitions=4)
    setup_topics(config)
    return config


def test_poison_never_stops_the_group_and_missing_ids_are_one_per_call(config, prefix, tmp_path: Path):
    items = records()
    first = start_role(config, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    second = None
    try:
        wait_for_assignment(first)  # the embedded broker wedges if a member joins mid-rebalance
        second = start_role(config, ["normalize"], tmp_path, DESTINATIONS="amplitude")
        wait_for_assignment(second)
        produce(config, "raw", items)

        def gone() -> bool:  # a crash loop: stop waiting once no member is left
            return not (first.alive() or second.alive())

        poison_keys = {f"poison-{name}" for name in POISON}
        read(config, "dest.amplitude", lambda seen: message_ids(seen) >= GOOD_IDS or gone(), timeout=90)
        read(config, "dlq.raw", lambda seen: {m.key().decode() for m in seen} >= poison_keys or gone(), timeout=90)
        for role in (first, second):
            assert role.alive(), f"a normaliser died:\n{role.log_path.read_text()[-4000:]}"
        raw = read_count(config, "raw", len(items))
        assert len(raw) == len(items)
        want_ids, want_dead = expectations(raw)
        read(config, "dest.amplitude", lambda seen: message_ids(seen) >= want_ids, timeout=60)
        read(config, "dlq.raw", lambda seen: dead_letters(seen) >= want_dead, timeout=60)
        assert first.alive() and second.alive(), "a normaliser died"
    finally:
        exits = [first.terminate(), second.terminate() if second is not None else 0]
    assert exits == [0, 0]
    logs = [role.log_path.read_text() for role in (first, second)]
    assert all("dead-lettered" in log for log in logs), "both members must have met poison"
    assert not any("event failed unexpectedly" in log for log in logs), "an exception nobody expected"

    amplitude = settle(config, "dest.amplitude")
    dead = settle(config, "dlq.raw")
    # Exactly what the pipeline says: nothing lost, nothing extra (redelivery after a rebalance
    # writes the same ids and the same dead letters again, so sets are compared).
    assert message_ids(amplitude) == want_ids
    assert dead_letters(dead) == want_dead

    # Every good event reached the destination topic.
    events = [CODEC.decode(m.value())[0] for m in amplitude]
    assert {e["messageId"] for e in events} >= GOOD_IDS
    assert next(e["context"].get("location") for e in events if e["messageId"] == "good-nul-ip") is None
    assert {e["timestamp"] for e in events if e["messageId"] == "good-week-date"} == {"2026-11-22T10:00:00.000Z"}
    assert [e["messageId"][:3] for e in events if e.get("event") == "At The Limit"][:1] == ["sw-"]
    # Identical calls without a messageId: two calls, two ids (Amberflo bills both).
    twins = {e["messageId"] for e in events if e.get("event") == "Twin Billed"}
    batch_twins = {e["messageId"] for e in events if e.get("event") == "Twin Batch Billed"}
    assert len(twins) == 2 and len(batch_twins) == 2

    # Every poison record is on dlq.raw, as invalid, with its reason.
    by_key: dict[str, list[dict[str, str]]] = {}
    for message in dead:
        by_key.setdefault(message.key().decode(), []).append(header_map(message.headers()))
    for name, (_value, fragment) in POISON.items():
        headers = by_key[f"poison-{name}"][0]
        assert fragment in headers["error"], (name, headers["error"])
        assert headers["error_kind"] == "invalid" and headers["destination"] == "raw"
    assert {h["batch_index"] for h in by_key["mixed-batch"]} == {"1"}
    near_limit = by_key["poison-near the message-size limit"][0]
    assert int(near_limit["truncated"]) == NEAR_LIMIT_BYTES

    # Reprocessing: a new consumer group starts from offset 0 and writes the very same ids again.
    marks: dict[int, int] = {}
    for message in amplitude:
        marks[message.partition()] = max(marks.get(message.partition(), -1), message.offset())

    def second_pass(seen):
        return [m for m in seen if m.offset() > marks.get(m.partition(), -1)]

    again = start_role(
        config, ["normalize"], tmp_path, DESTINATIONS="amplitude", CONSUMER_GROUP_PREFIX=f"{prefix}again."
    )
    try:
        seen = read(config, "dest.amplitude", lambda seen: message_ids(second_pass(seen)) >= want_ids, timeout=90)
    finally:
        assert again.terminate() == 0
    assert message_ids(second_pass(seen)) == want_ids
