"""From request JSON to the raw message: type from the path, stamps, limits, key."""

from __future__ import annotations

import re

import orjson
import pytest

from worker.collector.payloads import (
    EVENT_TYPES,
    Shape,
    build_message,
    decode_document,
    key_of,
    received_at_now,
)
from worker.collector.responses import HttpError
from worker.segment.envelope import MAX_BATCH_BYTES, MAX_EVENT_BYTES, parse

NOW = "2024-05-01T12:00:00.123Z"


def loads(value: bytes) -> dict:
    return orjson.loads(value)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_typed_endpoints_set_type_from_the_path(event_type: str) -> None:
    message = build_message({"type": "something-else", "userId": "u1"}, Shape.EVENT, event_type, NOW, "1.2.3.4")
    assert message is not None
    assert loads(message.value)["type"] == event_type


def test_event_is_stamped_with_received_at_and_ip_and_loses_its_write_key() -> None:
    message = build_message({"userId": "u1", "event": "E", "writeKey": "secret"}, Shape.EVENT, "track", NOW, "1.2.3.4")
    assert message is not None
    event = loads(message.value)
    assert event == {"userId": "u1", "event": "E", "type": "track", "receivedAt": NOW, "context": {"ip": "1.2.3.4"}}
    assert message.key == "u1" and message.events == 1


def test_a_clients_received_at_is_replaced_and_its_ip_kept() -> None:
    document = {"userId": "u1", "receivedAt": "1999-01-01T00:00:00Z", "context": {"ip": "9.9.9.9", "locale": "de"}}
    message = build_message(document, Shape.EVENT, "identify", NOW, "1.2.3.4")
    assert message is not None
    event = loads(message.value)
    assert event["receivedAt"] == NOW
    assert event["context"] == {"ip": "9.9.9.9", "locale": "de"}


def test_received_at_format() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", received_at_now())


def test_batch_items_are_each_stamped_and_the_envelope_kept() -> None:
    document = {
        "batch": [{"type": "track", "anonymousId": "a1", "event": "E"}, {"type": "identify", "userId": "u2"}],
        "sentAt": "2024-05-01T12:00:00.000Z",
        "writeKey": "secret",
    }
    message = build_message(document, Shape.BATCH, None, NOW, "1.2.3.4")
    assert message is not None
    envelope = loads(message.value)
    assert "writeKey" not in envelope and envelope["sentAt"] == "2024-05-01T12:00:00.000Z"
    assert [item["receivedAt"] for item in envelope["batch"]] == [NOW, NOW]
    assert [item["context"]["ip"] for item in envelope["batch"]] == ["1.2.3.4", "1.2.3.4"]
    assert message.key == "a1" and message.events == 2  # keyed by the first event


def test_a_batch_context_ip_is_not_overridden_by_the_socket_ip() -> None:
    document = {"batch": [{"type": "track", "userId": "u", "event": "E"}], "context": {"ip": "9.9.9.9"}}
    message = build_message(document, Shape.BATCH, None, NOW, "1.2.3.4")
    assert message is not None
    # The normaliser merges the batch context under each event: the batch's ip reaches the event.
    assert parse(message.value).events[0]["context"]["ip"] == "9.9.9.9"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"type": "track"}, "`batch` must be an array of events, got null"),
        ({"batch": {"type": "track"}}, "`batch` must be an array of events, got object"),
        ({"batch": [{"type": "track"}, 3]}, "batch[1] must be an object, got number"),
        ({"batch": [{"type": "track", "userId": "u"}], "context": "x"}, "batch `context` must be an object"),
    ],
)
def test_batch_shape_is_checked(document: dict, reason: str) -> None:
    with pytest.raises(HttpError) as caught:
        build_message(document, Shape.BATCH, None, NOW, None)
    assert caught.value.status == 400
    assert reason in caught.value.message


def test_an_empty_batch_writes_nothing() -> None:
    assert build_message({"batch": []}, Shape.BATCH, None, NOW, None) is None


def test_a_batch_on_a_typed_endpoint_is_refused() -> None:
    with pytest.raises(HttpError) as caught:
        build_message({"batch": []}, Shape.EVENT, "track", NOW, None)
    assert caught.value.status == 400


def test_jitsu_endpoint_takes_an_event_or_a_batch() -> None:
    single = build_message({"type": "page", "anonymousId": "a"}, Shape.EITHER, None, NOW, None)
    assert single is not None and loads(single.value)["type"] == "page"
    batch = build_message({"batch": [{"type": "page", "anonymousId": "a"}]}, Shape.EITHER, None, NOW, None)
    assert batch is not None and batch.events == 1 and "batch" in loads(batch.value)


def test_event_over_32_kb_after_stamping_is_segments_400() -> None:
    filler = "x" * (MAX_EVENT_BYTES - 60)
    with pytest.raises(HttpError) as caught:
        build_message({"userId": "u", "properties": {"p": filler}}, Shape.EVENT, "track", NOW, "1.2.3.4")
    assert caught.value.status == 400
    assert caught.value.message.startswith("Exceed payload limit")


def test_one_event_over_32_kb_fails_its_whole_batch() -> None:
    items = [
        {"type": "track", "userId": "u", "event": "E"},
        {"type": "track", "userId": "u", "properties": {"p": "x" * MAX_EVENT_BYTES}},
    ]
    with pytest.raises(HttpError) as caught:
        build_message({"batch": items}, Shape.BATCH, None, NOW, None)
    assert caught.value.status == 400
    assert "batch[1]" in caught.value.message


def test_batch_over_500_kb_is_segments_400() -> None:
    items = [{"type": "track", "userId": "u", "event": "E", "properties": {"p": "x" * 30_000}} for _ in range(17)]
    assert len(orjson.dumps({"batch": items})) < MAX_BATCH_BYTES < len(orjson.dumps({"batch": items * 2}))
    with pytest.raises(HttpError) as caught:
        build_message({"batch": items * 2}, Shape.BATCH, None, NOW, None)
    assert caught.value.status == 400
    assert caught.value.message.startswith("Exceed payload limit")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"type": "track", ', 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'{"userId": "\xc3\x28"}', 400, "invalid_json"),  # invalid UTF-8
        (b"[1, 2]", 400, "invalid_request"),
        (b'"text"', 400, "invalid_request"),
    ],
)
def test_malformed_bodies(body: bytes, status: int, code: str) -> None:
    with pytest.raises(HttpError) as caught:
        decode_document(body)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_key_is_user_id_else_anonymous_id() -> None:
    assert key_of({"userId": "u", "anonymousId": "a"}) == "u"
    assert key_of({"userId": "", "anonymousId": "a"}) == "a"
    assert key_of({"userId": 42}) == "42"
    assert key_of({"userId": True, "anonymousId": None}) is None
    assert key_of({}) is None
