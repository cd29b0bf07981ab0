"""The normaliser as a real process on the real embedded broker."""

from __future__ import annotations

import time
from collections import defaultdict

import orjson
import pytest

from tests.kafka_helpers import (
    crash_test_variables,
    produce,
    read,
    read_count,
    settings_for,
    settle,
    setup_topics,
    start_role,
)
from worker.avro_codec import EventCodec
from worker.dlq.headers import header_map
from worker.samples import sample_payloads

pytestmark = pytest.mark.integration
CODEC = EventCodec()


def decode(message):
    return CODEC.decode(message.value())[0]


@pytest.fixture
def settings(broker, prefix):
    settings = settings_for(broker, prefix)
    setup_topics(settings)
    return settings


def test_samples_flow_to_every_destination_keyed_and_ordered_per_user(settings, tmp_path):
    payloads, good, poison = sample_payloads(users=6)
    normaliser = start_role(settings, ["normalize"], tmp_path)
    try:
        produce(settings, "raw", payloads)
        outputs = {d: read_count(settings, f"dest.{d}", good) for d in settings.settings.destinations}
        dead = read_count(settings, "dlq.raw", len(poison))
    finally:
        assert normaliser.terminate() == 0
    for destination, messages in outputs.items():
        assert len(messages) == good, destination
        events = [decode(m) for m in messages]
        assert {e["type"] for e in events} == {"track", "identify", "page", "screen", "group", "alias"}
        assert len({e["messageId"] for e in events}) == good
        by_key: dict[str, set[int]] = defaultdict(set)
        for message, event in zip(messages, events, strict=True):
            key = message.key().decode()
            assert key == (event.get("userId") or event["anonymousId"])
            by_key[key].add(message.partition())
        assert all(len(partitions) == 1 for partitions in by_key.values()), by_key
    # Order within a user: events that arrived in one raw message (the batch envelopes of the odd
    # users) come out on one partition in their original order. (Events a producer keyed differently
    # on segment.raw can be processed in any order relative to each other.)
    amplitude = outputs["amplitude"]
    for user in ("user-1", "user-3", "user-5"):
        mine = sorted((m for m in amplitude if m.key() == user.encode()), key=lambda m: m.offset())
        stamps = [decode(m)["originalTimestamp"] for m in mine]
        assert len(stamps) == 6 and stamps == sorted(stamps), (user, stamps)
    # Batch-envelope events got the batch context (ip) and then geo enrichment.
    batched = [decode(m) for m in amplitude if m.key() == b"user-1" and decode(m)["type"] == "track"]
    assert len(batched) == 2 and all(e["context"]["location"]["country"] for e in batched)
    assert sorted(header_map(m.headers())["error_kind"] for m in dead) == ["invalid"] * len(poison)


POISON = {
    "invalid JSON": b'{"type": "track", ',
    "invalid UTF-8": b'{"type": "track", "userId": "\xc3\x28", "event": "E"}',
    "wrong type": orjson.dumps({"type": "track", "userId": {"nested": True}, "event": "E"}),
    "oversize": orjson.dumps({"type": "track", "userId": "u", "event": "E", "properties": {"p": "x" * 600_000}}),
    "10k-deep nesting": b'{"type": "track", "userId": "u", "event": "E", "properties": '
    + b"[" * 10_000
    + b"]" * 10_000
    + b"}",
    "not an object": b"[1, 2, 3]",
    "tombstone": None,
}


def test_poison_input_is_dead_lettered_with_a_reason_while_good_events_flow(settings, tmp_path):
    items = []
    for i, (name, value) in enumerate(POISON.items()):
        items.append((f"poison-{name}", value))
        items.append(
            (f"good-{i}", orjson.dumps({"type": "track", "userId": f"good-{i}", "event": "Fine", "messageId": f"g{i}"}))
        )
    normaliser = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        produce(settings, "raw", items)
        good = read_count(settings, "dest.amplitude", len(POISON))
        dead = read_count(settings, "dlq.raw", len(POISON))
        assert normaliser.alive()
    finally:
        assert normaliser.terminate() == 0
    assert sorted(decode(m)["messageId"] for m in good) == sorted(f"g{i}" for i in range(len(POISON)))
    by_key = {m.key().decode(): (m, header_map(m.headers())) for m in dead}
    assert set(by_key) == {f"poison-{name}" for name in POISON}
    expected_reason = {
        "invalid JSON": "malformed JSON",
        "invalid UTF-8": "malformed JSON",
        "wrong type": "`userId` must be a string",
        "oversize": "the limit is 512000 bytes a batch",
        "10k-deep nesting": "malformed JSON",
        "not an object": "payload must be a JSON object",
        "tombstone": "empty message",
    }
    for name, fragment in expected_reason.items():
        message, headers = by_key[f"poison-{name}"]
        assert fragment in headers["error"], (name, headers["error"])
        assert headers["error_kind"] == "invalid" and headers["destination"] == "raw"
        assert headers["original_topic"] == settings.names.raw
        assert int(headers["original_offset"]) >= 0 and headers["failed_at"].endswith("Z")
        assert message.value() == (POISON[name] or b"")  # original bytes kept for replay


def _track(i: int) -> tuple[str, bytes]:
    user = f"user-{i % 50}"
    return user, orjson.dumps({"type": "track", "userId": user, "event": "Load", "messageId": f"m{i}"})


def _message_ids(messages) -> set[str]:
    return {decode(m)["messageId"] for m in messages}


def test_sigterm_mid_stream_loses_nothing(settings, tmp_path):
    total = 30_000
    produce(settings, "raw", [_track(i) for i in range(total)])
    first = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        read(settings, "dest.amplitude", lambda seen: len(seen) >= 3000, timeout=60)
    finally:
        assert first.terminate() == 0  # graceful: drained, committed, left the group
    seen_after_first = settle(settings, "dest.amplitude", timeout=2)
    assert len(seen_after_first) < total, "stopped too late to test anything; raise total"
    second = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        messages = read(settings, "dest.amplitude", lambda seen: len(_message_ids(seen)) >= total, timeout=90)
    finally:
        assert second.terminate() == 0
    assert _message_ids(messages) == {f"m{i}" for i in range(total)}
    # A graceful stop commits what it wrote, so the restart redoes (almost) nothing.
    assert len(messages) - total < 0.05 * total


def test_kill_9_mid_stream_loses_nothing(broker, settings, tmp_path):
    crash = crash_test_variables(broker)
    total = 20_000
    produce(settings, "raw", [_track(i) for i in range(total)])
    first = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude", **crash)
    read(settings, "dest.amplitude", lambda seen: len(seen) >= 2000, timeout=60)
    first.kill()
    second = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude", **crash)
    try:
        messages = read(settings, "dest.amplitude", lambda seen: len(_message_ids(seen)) >= total, timeout=90)
    finally:
        assert second.terminate() == 0
    assert _message_ids(messages) == {f"m{i}" for i in range(total)}


def test_a_second_normaliser_joins_the_group_and_takes_partitions_without_loss(settings, tmp_path):
    total = 20_000
    first = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    second = None
    try:
        produce(settings, "raw", [_track(i) for i in range(total // 2)])
        read(settings, "dest.amplitude", lambda seen: len(seen) >= 1000, timeout=60)
        second = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
        deadline = time.monotonic() + 30
        while "partitions assigned" not in second.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        produce(settings, "raw", [_track(i) for i in range(total // 2, total)])
        messages = read(settings, "dest.amplitude", lambda seen: len(_message_ids(seen)) >= total, timeout=90)
    finally:
        assert first.terminate() == 0
        if second is not None:
            assert second.terminate() == 0
    assert _message_ids(messages) == {f"m{i}" for i in range(total)}
    second_log = second.log_path.read_text()
    assert "partitions assigned" in second_log, "the second process never got partitions"
    assert "partitions revoked" in first.log_path.read_text(), "the first process never handed any over"


def test_identity_filled_across_partitions_and_across_a_restart(settings, tmp_path):
    def write(partition: int, key: str, event: dict) -> None:
        producer = settings.kafka.producer()
        errors: list = []
        producer.produce(
            settings.names.raw,
            orjson.dumps(event),
            key,
            lambda e, _m: errors.append(e) if e else None,
            partition=partition,
        )
        assert producer.flush(10) == 0 and not errors

    first = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        write(0, "user-9", {"type": "identify", "userId": "user-9", "anonymousId": "anon-9", "messageId": "id-1"})
        read(settings, "dest.amplitude", lambda seen: "id-1" in _message_ids(seen))
        write(3, "anon-9", {"type": "page", "anonymousId": "anon-9", "name": "Home", "messageId": "page-1"})
        messages = read(settings, "dest.amplitude", lambda seen: "page-1" in _message_ids(seen))
    finally:
        assert first.terminate() == 0
    page = next(decode(m) for m in messages if decode(m)["messageId"] == "page-1")
    assert page["userId"] == "user-9"
    links = read_count(settings, "identities", 1)
    assert [(m.key(), m.value()) for m in links] == [(b"anon-9", b"user-9")]

    # A new process knows nothing in memory: it must load the link from the compacted topic.
    second = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        write(2, "anon-9", {"type": "track", "anonymousId": "anon-9", "event": "Back", "messageId": "track-2"})
        messages = read(settings, "dest.amplitude", lambda seen: "track-2" in _message_ids(seen))
    finally:
        assert second.terminate() == 0
    track = next((m, decode(m)) for m in messages if decode(m)["messageId"] == "track-2")
    assert track[1]["userId"] == "user-9" and track[0].key() == b"user-9"


def test_metrics_and_probes_are_served_and_counters_move(settings, tmp_path):
    import urllib.error
    import urllib.request

    from worker.kafka.broker import free_port

    port = free_port()
    normaliser = start_role(
        settings,
        ["normalize"],
        tmp_path,
        DESTINATIONS="amplitude",
        METRICS_PORT=str(port),
        KAFKA_STATISTICS_INTERVAL_MS="300",
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    try:
        deadline = time.monotonic() + 30
        while get("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert get("/readyz")[0] == 200 and get("/healthz")[0] == 200
        produce(settings, "raw", [_track(i) for i in range(50)] + [("bad", b"{not json")])
        read_count(settings, "dest.amplitude", 50)
        read_count(settings, "dlq.raw", 1)
        raw, dest, dlq = settings.names.raw, settings.names.dest("amplitude"), settings.names.dlq("raw")
        # Lag comes with librdkafka's next statistics; writes are counted once acknowledged, which
        # the normaliser learns on a later loop turn than the one that wrote them.
        wanted = [f'segment_worker_produced_total{{topic="{dest}"}} 50.0'] + [
            f'segment_worker_consumer_lag{{partition="{partition}",topic="{raw}"}}' for partition in range(4)
        ]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = get("/metrics")[1]
            if all(line in text for line in wanted):
                break
            time.sleep(0.2)
    finally:
        assert normaliser.terminate() == 0
    assert f'segment_worker_consumed_total{{topic="{raw}"}} 51.0' in text
    assert f'segment_worker_produced_total{{topic="{dest}"}} 50.0' in text
    assert f'segment_worker_produced_total{{topic="{dlq}"}} 1.0' in text
    assert 'segment_worker_dead_lettered_total{destination="raw",kind="invalid"} 1.0' in text
    assert "segment_worker_assigned_partitions 4.0" in text
    for partition in range(4):  # lag per partition, from librdkafka statistics
        assert f'segment_worker_consumer_lag{{partition="{partition}",topic="{raw}"}}' in text
