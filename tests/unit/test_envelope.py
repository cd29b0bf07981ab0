import orjson
import pytest

from worker.segment.envelope import MAX_BATCH_BYTES, MAX_EVENT_BYTES, InvalidPayload, deep_merge, parse


def test_single_event_passes_through():
    envelope = parse(b'{"type":"track","userId":"u1","event":"E"}')
    assert envelope.events == [{"type": "track", "userId": "u1", "event": "E"}]
    assert not envelope.is_batch and not envelope.rejected


def test_batch_context_is_merged_under_each_event_and_the_event_wins():
    payload = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "context": {"app": {"name": "mine"}, "ip": "1.1.1.1"}},
            {"type": "page", "userId": "u1", "name": "Home"},
        ],
        "context": {"app": {"name": "batch", "version": "1.0"}, "ip": "9.9.9.9", "locale": "de-DE"},
        "sentAt": "2026-01-01T00:00:05Z",
    }
    envelope = parse(orjson.dumps(payload))
    first, second = envelope.events
    assert first["context"] == {"app": {"name": "mine", "version": "1.0"}, "ip": "1.1.1.1", "locale": "de-DE"}
    assert second["context"] == payload["context"]
    assert first["sentAt"] == second["sentAt"] == "2026-01-01T00:00:05Z"
    assert envelope.indexes == [0, 1] and envelope.is_batch


def test_batch_items_that_are_not_objects_are_rejected_alone():
    envelope = parse(b'{"batch":[{"type":"track","userId":"u","event":"E"}, 42, "x"]}')
    assert len(envelope.events) == 1
    assert [(r.index, r.reason) for r in envelope.rejected] == [
        (1, "batch item must be an object, got number"),
        (2, "batch item must be an object, got string"),
    ]


def test_oversized_event_in_a_batch_is_rejected_but_its_batch_mates_go_on():
    big = {"type": "track", "userId": "u", "event": "E", "properties": {"blob": "x" * MAX_EVENT_BYTES}}
    small = {"type": "track", "userId": "u", "event": "E"}
    envelope = parse(orjson.dumps({"batch": [small, big, small]}))
    assert envelope.indexes == [0, 2]
    assert envelope.rejected[0].index == 1 and "limit is 32768 bytes an event" in envelope.rejected[0].reason
    assert orjson.loads(envelope.rejected[0].value)["properties"]["blob"] == "x" * MAX_EVENT_BYTES


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty message"),
        (None, "empty message"),
        (b'{"type": "track"', "malformed JSON"),
        (b'{"type": "tr\xffck"}', "malformed JSON"),  # invalid UTF-8
        (b"[1, 2]", "payload must be a JSON object, got array"),
        (b'"text"', "payload must be a JSON object, got string"),
        (b'{"batch": {"a": 1}}', "`batch` must be an array, got object"),
        (b'{"batch": [], "context": []}', "batch `context` must be an object, got array"),
        (b"[" * 10_000 + b"]" * 10_000, "malformed JSON"),  # 10k-deep nesting
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "malformed JSON"),
    ],
)
def test_unusable_payloads_raise_with_a_reason(payload, reason):
    with pytest.raises(InvalidPayload, match=reason):
        parse(payload)


def test_size_limits():
    single = orjson.dumps({"type": "track", "userId": "u", "event": "E", "properties": {"b": "x" * MAX_EVENT_BYTES}})
    with pytest.raises(InvalidPayload, match="limit is 32768 bytes an event"):
        parse(single)
    batch = orjson.dumps({"batch": [{"type": "track", "userId": "u", "event": "E"}], "pad": "x" * MAX_BATCH_BYTES})
    with pytest.raises(InvalidPayload, match="limit is 512000 bytes a batch"):
        parse(batch)


def test_deep_merge_does_not_mutate_its_inputs():
    base = {"a": {"b": 1}}
    merged = deep_merge(base, {"a": {"c": 2}})
    assert merged == {"a": {"b": 1, "c": 2}} and base == {"a": {"b": 1}}
