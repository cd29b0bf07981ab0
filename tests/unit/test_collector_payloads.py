"""From request JSON to the raw messages: type from the path, stamps, limits, one message an event, keys."""

from __future__ import annotations

import re

import orjson
import pytest

from worker.avro_codec import EventCodec
from worker.collector.payloads import (
    EVENT_TYPES,
    RawMessage,
    Shape,
    build_messages,
    decode_document,
    key_of,
    received_at_now,
)
from worker.collector.responses import HttpError
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser, Result
from worker.normalize.user_agent import UserAgentEnricher
from worker.segment.envelope import MAX_BATCH_BYTES, MAX_DEPTH, MAX_EVENT_BYTES, parse

NOW = "2024-05-01T12:00:00.123Z"
ALL = ["amplitude", "amberflo", "reteno", "brevo"]


def loads(value: bytes) -> dict:
    return orjson.loads(value)


def build_message(document: dict, shape: Shape, event_type: str | None, received_at: str, ip: str | None) -> RawMessage:
    """The one message of a request that writes one."""
    [message] = build_messages(document, shape, event_type, received_at, ip)
    return message


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_typed_endpoints_set_type_from_the_path(event_type: str) -> None:
    message = build_message({"type": "something-else", "userId": "u1"}, Shape.EVENT, event_type, NOW, "1.2.3.4")
    assert loads(message.value)["type"] == event_type


def test_event_is_stamped_with_received_at_and_ip_and_loses_its_write_key() -> None:
    message = build_message({"userId": "u1", "event": "E", "writeKey": "secret"}, Shape.EVENT, "track", NOW, "1.2.3.4")
    event = loads(message.value)
    assert event == {"userId": "u1", "event": "E", "type": "track", "receivedAt": NOW, "context": {"ip": "1.2.3.4"}}
    assert message.key == "u1"


def test_a_clients_received_at_is_replaced_and_its_ip_kept() -> None:
    document = {"userId": "u1", "receivedAt": "1999-01-01T00:00:00Z", "context": {"ip": "9.9.9.9", "locale": "de"}}
    message = build_message(document, Shape.EVENT, "identify", NOW, "1.2.3.4")
    event = loads(message.value)
    assert event["receivedAt"] == NOW
    assert event["context"] == {"ip": "9.9.9.9", "locale": "de"}


def test_received_at_format() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", received_at_now())


def test_batch_items_are_each_stamped_and_written_one_a_message_with_the_batch_fields() -> None:
    document = {
        "batch": [{"type": "track", "anonymousId": "a1", "event": "E"}, {"type": "identify", "userId": "u2"}],
        "sentAt": "2024-05-01T12:00:00.000Z",
        "writeKey": "secret",
    }
    messages = build_messages(document, Shape.BATCH, None, NOW, "1.2.3.4")
    assert [m.key for m in messages] == ["a1", "u2"]  # each event keyed by its own user
    envelopes = [loads(m.value) for m in messages]
    assert all(e.keys() == {"batch"} and len(e["batch"]) == 1 for e in envelopes)  # one-event envelopes
    events = [e["batch"][0] for e in envelopes]
    assert [e["type"] for e in events] == ["track", "identify"]  # in the request's order
    assert all("writeKey" not in e and e["sentAt"] == "2024-05-01T12:00:00.000Z" for e in events)
    assert [e["receivedAt"] for e in events] == [NOW, NOW]
    assert [e["context"]["ip"] for e in events] == ["1.2.3.4", "1.2.3.4"]


def test_a_batch_of_three_users_is_one_message_an_event_keyed_by_its_user() -> None:
    items = [
        {"type": "track", "userId": "u1", "event": "A"},
        {"type": "track", "anonymousId": "anon-2", "event": "B"},
        {"type": "identify", "userId": "u3", "anonymousId": "anon-3"},
        {"type": "track", "userId": "u1", "event": "C"},
        {"type": "track", "userId": 7.0, "event": "D"},  # the normaliser writes this userId as "7"
        {"type": "track", "event": "no user"},  # dead-lettered by the normaliser; no key to give it
    ]
    messages = build_messages({"batch": items}, Shape.BATCH, None, NOW, None)
    assert [m.key for m in messages] == ["u1", "anon-2", "u3", "u1", "7", None]
    assert [loads(m.value)["batch"][0].get("event") for m in messages] == ["A", "B", None, "C", "D", "no user"]


def test_a_batch_context_ip_is_not_overridden_by_the_socket_ip() -> None:
    document = {"batch": [{"type": "track", "userId": "u", "event": "E"}], "context": {"ip": "9.9.9.9"}}
    message = build_message(document, Shape.BATCH, None, NOW, "1.2.3.4")
    # The batch context is merged under the event's: the batch's ip reaches it.
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
        build_messages(document, Shape.BATCH, None, NOW, None)
    assert caught.value.status == 400
    assert reason in caught.value.message


def test_an_empty_batch_writes_nothing() -> None:
    assert build_messages({"batch": []}, Shape.BATCH, None, NOW, None) == []


def test_a_batch_on_a_typed_endpoint_is_refused() -> None:
    with pytest.raises(HttpError) as caught:
        build_messages({"batch": []}, Shape.EVENT, "track", NOW, None)
    assert caught.value.status == 400


def test_jitsu_endpoint_takes_an_event_or_a_batch() -> None:
    single = build_message({"type": "page", "anonymousId": "a"}, Shape.EITHER, None, NOW, None)
    assert loads(single.value)["type"] == "page"
    batch = build_message({"batch": [{"type": "page", "anonymousId": "a"}]}, Shape.EITHER, None, NOW, None)
    assert "batch" in loads(batch.value)


def test_event_over_32_kb_after_stamping_is_segments_400() -> None:
    filler = "x" * (MAX_EVENT_BYTES - 60)
    with pytest.raises(HttpError) as caught:
        build_messages({"userId": "u", "properties": {"p": filler}}, Shape.EVENT, "track", NOW, "1.2.3.4")
    assert caught.value.status == 400
    assert caught.value.message.startswith("Exceed payload limit")


def test_one_event_over_32_kb_fails_its_whole_batch() -> None:
    items = [
        {"type": "track", "userId": "u", "event": "E"},
        {"type": "track", "userId": "u", "properties": {"p": "x" * MAX_EVENT_BYTES}},
    ]
    with pytest.raises(HttpError) as caught:
        build_messages({"batch": items}, Shape.BATCH, None, NOW, None)
    assert caught.value.status == 400
    assert "batch[1]" in caught.value.message


def test_batch_over_500_kb_is_segments_400() -> None:
    items = [{"type": "track", "userId": "u", "event": "E", "properties": {"p": "x" * 30_000}} for _ in range(17)]
    assert len(orjson.dumps({"batch": items})) < MAX_BATCH_BYTES < len(orjson.dumps({"batch": items * 2}))
    with pytest.raises(HttpError) as caught:
        build_messages({"batch": items * 2}, Shape.BATCH, None, NOW, None)
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
    assert key_of({"userId": 42.0}) == "42" and key_of({"userId": 4.5}) == "4.5"  # as validation writes them
    assert key_of({"userId": True, "anonymousId": None}) is None
    assert key_of({}) is None


# -- a batch written one event a message is normalised as the whole batch was ------------------------

IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Mobile/15E148 Safari/604.1"
)
KAFKA_TS = 1_714_564_800_000
RAW_TOPIC = "t.segment.raw"


def batch_with_every_envelope_field() -> dict:
    return {
        "batch": [
            # Its own context is merged over the batch's (device.model replaced, device.id kept);
            # its clock runs ~5 s ahead of the server's: the batch's sentAt corrects its timestamp.
            {
                "type": "track",
                "userId": "u1",
                "event": "Order Completed",
                "messageId": "m1",
                "originalTimestamp": "2024-05-01T12:00:03.000Z",
                "context": {"app": {"name": "shop"}, "device": {"model": "Y"}},
            },
            # Its own sentAt wins over the batch's; no messageId, so one is derived.
            {
                "type": "page",
                "anonymousId": "a2",
                "name": "Home",
                "sentAt": "2024-05-01T12:00:10.000Z",
                "timestamp": "2024-05-01T12:00:09.000Z",
            },
            # Its own integrations replace the batch's.
            {"type": "identify", "userId": "u3", "messageId": "m3", "integrations": {"Amplitude": False}},
            # A field named `batch` in an event: an unknown field, carried as extra, not an envelope.
            {"type": "track", "userId": "u1", "event": "Odd", "messageId": "m4", "batch": "not an envelope"},
            # Invalid: dead-lettered, as itself with the batch's fields merged in.
            {"type": "track", "userId": "u5", "messageId": "m5"},
            {"type": "track", "userId": "u6", "event": "E", "messageId": "m6", "context": "not an object"},
        ],
        "context": {
            "library": {"name": "analytics-python", "version": "2.3.0"},
            "device": {"id": "dev-1", "model": "X"},
            "userAgent": IPHONE_UA,
        },
        "sentAt": "2024-05-01T12:00:05.000Z",
        "integrations": {"All": True, "Brevo": False},
        "channel": "server",
        "custom": "an envelope field the normaliser ignores",
        "writeKey": "secret",
    }


@pytest.fixture(scope="module")
def enrichers() -> list:
    return [GeoEnricher(), UserAgentEnricher()]


def normalised(results: list[Result]) -> tuple[list[tuple], list[tuple[bytes, str]]]:
    """What the normaliser wrote, comparably: routed (key, destinations, event, extra) and rejected
    (value, reason). A derived messageId hashes the record's coordinates, so only its form is kept."""
    routed, rejected = [], []
    codec = EventCodec()
    for result in results:
        for r in result.routed:
            event, extra = codec.decode(r.value)
            assert event == r.event
            if event["messageId"].startswith("sw-"):
                event["messageId"] = "derived"
            routed.append((r.key, r.destinations, event, extra))
        rejected.extend((r.value, r.reason) for r in result.rejected)
    return routed, rejected


@pytest.mark.parametrize("socket_ip", ["81.2.69.142", None])
def test_events_written_one_a_message_normalise_as_they_did_inside_their_batch(
    enrichers: list, socket_ip: str | None
) -> None:
    document = batch_with_every_envelope_field()
    messages = build_messages(document, Shape.BATCH, None, NOW, socket_ip)
    whole = orjson.dumps(document)  # stamped in place: the one message the collector used to write
    assert b"secret" not in whole and not any(b"secret" in m.value for m in messages)

    before = Normaliser(ALL, IdentityMap(100), enrichers).process(whole, KAFKA_TS, RAW_TOPIC, 0, 0)
    each = Normaliser(ALL, IdentityMap(100), enrichers)
    after = [each.process(m.value, KAFKA_TS, RAW_TOPIC, i % 3, i) for i, m in enumerate(messages)]

    assert normalised(after) == normalised([before])
    routed, rejected = normalised(after)
    assert len(routed) == 4 and len(rejected) == 2
    order = {event["messageId"]: event for _key, _dest, event, _extra in routed}
    # The effects themselves, so that "the same as before" is not "the same nothing".
    assert order["m1"]["timestamp"] == "2024-05-01T11:59:58.123Z"  # receivedAt - (sentAt - originalTimestamp)
    assert order["m1"]["sentAt"] == "2024-05-01T12:00:05.000Z"
    assert order["m1"]["context"]["device"]["id"] == "dev-1" and order["m1"]["context"]["device"]["model"] == "Y"
    assert order["m1"]["context"]["library"]["name"] == "analytics-python" and order["m1"]["channel"] == "server"
    assert order["m1"]["integrations"] == {"All": True, "Brevo": False}
    assert order["m3"]["integrations"] == {"Amplitude": False}
    assert order["derived"]["sentAt"] == "2024-05-01T12:00:10.000Z"
    assert order["derived"]["timestamp"] == "2024-05-01T11:59:59.123Z"
    assert [key for key, *_ in routed] == [m.key for m in messages[:4]] == ["u1", "a2", "u3", "u1"]
    assert routed[0][1] == ["amplitude", "amberflo", "reteno"]  # the batch's integrations: no Brevo
    assert routed[3][3] == {"batch": "not an envelope"}


def test_an_event_as_deep_as_its_batch_allows_is_still_read_by_the_normaliser(enrichers: list) -> None:
    """The one-event envelope adds two levels to an event merged with a batch context that was
    already at the deepest the encoder writes: joined as bytes, it is stored all the same."""
    context: dict = {}
    for _level in range(MAX_DEPTH - 2):  # 252 levels of objects; 253 with the batch's `context` key
        context = {"c": context}
    document = {"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": "m"}], "context": context}
    [message] = build_messages(document, Shape.BATCH, None, NOW, None)
    before = Normaliser(ALL, IdentityMap(10), enrichers).process(orjson.dumps(document), KAFKA_TS, RAW_TOPIC, 0, 0)
    after = Normaliser(ALL, IdentityMap(10), enrichers).process(message.value, KAFKA_TS, RAW_TOPIC, 0, 0)
    assert normalised([after]) == normalised([before])
    assert len(after.routed) == 1
