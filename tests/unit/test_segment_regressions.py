"""Regressions: every input that once crashed the normaliser (or slipped through it malformed), as a
plain test. Most were found by tests/unit/test_normaliser_fuzz.py; each names its root cause.

Each of these crashed the whole consumer group in turn (the exception escaped `Normaliser.process`,
the process exited, the next member got the same record), or wrote an event downstream that the
sinks could not read, or billed two calls as one.
"""

from __future__ import annotations

import orjson
import pytest

from worker.avro_codec import EventCodec
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.normalize.user_agent import UserAgentEnricher
from worker.segment.envelope import MAX_DEPTH, InvalidPayload, dumps_any, dumps_iteratively, nesting_depth, parse
from worker.segment.ids import anonymous_id_for_user
from worker.segment.timestamps import (
    MAX_MILLIS,
    MIN_MILLIS,
    InvalidTimestamp,
    is_canonical,
    iso_from_millis,
    millis_and_text,
    millis_of,
)

ALL = ["amplitude", "amberflo", "reteno", "brevo"]
KAFKA_TS = 1_795_000_000_000
ARABIC_INDIC = "".join(chr(0x0660 + d) for d in range(10))
AT = ("t.segment.raw", 2, 41)
CODEC = EventCodec()


@pytest.fixture(scope="module")
def enrichers():
    return [GeoEnricher(), UserAgentEnricher()]


@pytest.fixture
def normaliser(enrichers):
    return Normaliser(ALL, IdentityMap(1000), enrichers)


def track(**fields) -> dict:
    return {"type": "track", "userId": "u1", "event": "E", **fields}


def routed_one(normaliser, payload: bytes | dict, kafka_ts: int = KAFKA_TS, at=AT):
    value = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    result = normaliser.process(value, kafka_ts, *at)
    assert not result.rejected, result.rejected
    assert len(result.routed) == 1
    decoded, _extra = CODEC.decode(result.routed[0].value)
    assert decoded == result.routed[0].event
    return decoded


def rejected_one(normaliser, payload: bytes | dict, kafka_ts: int = KAFKA_TS) -> str:
    value = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    result = normaliser.process(value, kafka_ts, *AT)
    assert not result.routed and not result.filtered and not result.links
    assert len(result.rejected) == 1, result.rejected
    return result.rejected[0].reason


def nest(depth: int, inner: str = "null", kind: str = "list") -> bytes:
    """`depth` levels of arrays (or objects) around `inner`, as JSON text."""
    if kind == "list":
        return ("[" * depth + inner + "]" * depth).encode()
    return ('{"a":' * depth + inner + "}" * depth).encode()


# -- timestamps: digits str.isdigit() accepts and int() does not (or reads as something else) -----


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-22T10:00:00.\u00b2\u00b2\u00b2Z",  # superscripts: int() raised ValueError, uncaught
        "2026-11-22T10:00:00.\u0661\u0662\u0663Z",  # Arabic-Indic: int() read them; passed through as they were
        "2026-11-22T10:00:00".translate(str.maketrans("0123456789", ARABIC_INDIC)) + ".000Z",
        "2026-11-22T10:00:00.\u06f1\u06f2\u06f3Z",  # Extended Arabic-Indic
        "2026-11-22T10:00:00.\uff11\uff12\uff13Z",  # fullwidth
        "2026-11-22T10:00:00.\U0001d7d9\U0001d7da\U0001d7dbZ",  # mathematical double-struck
    ],
)
def test_non_ascii_digits_in_a_timestamp_are_invalid(normaliser, text):
    assert not is_canonical(text)
    with pytest.raises(InvalidTimestamp):
        millis_of(text)
    for field in ("timestamp", "originalTimestamp", "sentAt", "receivedAt"):
        assert "ISO-8601" in rejected_one(normaliser, track(**{field: text}))


def test_other_iso_shapes_of_canonical_length_are_canonicalised_not_passed_through(normaliser):
    # fromisoformat reads an ISO week date; the old shape check took it for canonical text.
    assert not is_canonical("2026-W47-7T10:00:00.000Z")
    out = routed_one(normaliser, track(timestamp="2026-W47-7T10:00:00.000Z"))
    assert out["timestamp"] == out["originalTimestamp"] == "2026-11-22T10:00:00.000Z"


@pytest.mark.parametrize(
    "text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:59:59+01:00"]
)
def test_offsets_past_the_ends_of_the_calendar_are_invalid(normaliser, text):
    # astimezone(UTC) raised OverflowError, uncaught. Found by the fuzz test as:
    with pytest.raises(InvalidTimestamp, match="outside the years 0001-9999"):
        millis_of(text)
    assert "outside the years 0001-9999" in rejected_one(normaliser, track(timestamp=text))


def test_fuzz_found_overflow_in_an_identify(normaliser):
    payload = (
        b'{"type":"identify","userId":"u1","messageId":"2000-01-01 00:00:00","sentAt":"2020-01-01T00:00:00.000Z",'
        b'"context":{},"integrations":{},"name":"0","category":"0","channel":"0","writeKey":null,"version":null,'
        b'"extraField":null,"timestamp":"0001-01-01T00:00:00+01:00"}'
    )
    assert "outside the years 0001-9999" in rejected_one(normaliser, payload)


def test_clock_skew_correction_past_the_calendar_is_invalid(normaliser):
    # receivedAt - (sentAt - originalTimestamp) landed in year 12025, written as "12025-11-16T...".
    reason = rejected_one(normaliser, track(timestamp="9999-12-31T00:00:00Z", sentAt="0001-01-01T00:00:00Z"))
    assert "clock skew" in reason and "0001-9999" in reason
    reason = rejected_one(normaliser, track(timestamp="0001-01-01T00:00:00Z", sentAt="9999-12-31T00:00:00Z"))
    assert "clock skew" in reason


def test_years_before_1000_are_zero_padded(normaliser):
    # glibc's strftime("%Y") does not pad: "999-01-01T00:00:00.000Z" is not ISO-8601. Found by the fuzz test.
    assert iso_from_millis(MIN_MILLIS) == "0001-01-01T00:00:00.000Z"
    assert iso_from_millis(MAX_MILLIS) == "9999-12-31T23:59:59.999Z"
    payload = b'{"type":"track","userId":"u1","event":"u1","messageId":0,"timestamp":"0999-01-01 00:00:00"}'
    out = routed_one(normaliser, payload)
    assert out["timestamp"] == out["originalTimestamp"] == "0999-01-01T00:00:00.000Z"
    assert out["messageId"] == "0"


@pytest.mark.parametrize("ms", [MIN_MILLIS - 1, MAX_MILLIS + 1, -(2**63), 2**63 - 1])
def test_millis_outside_the_calendar_are_invalid(ms):
    # time.gmtime raised OSError/OverflowError far out, and gave years like 12025 or -5 nearer.
    with pytest.raises(InvalidTimestamp):
        iso_from_millis(ms)


@pytest.mark.parametrize("kafka_ts", [MAX_MILLIS + 1, 2**63 - 1, -(2**63), MIN_MILLIS - 1])
def test_a_record_timestamp_outside_the_calendar_rejects_only_events_that_need_it(normaliser, kafka_ts):
    # A producer sets CreateTime to anything; it stood in for receivedAt, computed before the
    # per-event loop, so the exception took the whole batch (and the process) down.
    batch = {"batch": [track(event="needs it"), track(event="has its own", receivedAt="2026-11-22T10:00:00.000Z")]}
    result = normaliser.process(orjson.dumps(batch), kafka_ts, *AT)
    assert [r.event["event"] for r in result.routed] == ["has its own"]
    assert [r.index for r in result.rejected] == [0]
    assert "Kafka timestamp" in result.rejected[0].reason


@pytest.mark.parametrize(
    ("sent_at", "expected"),
    [("2020-01-01 00:00:00", "2020-01-01T00:00:00.000Z"), ("2020-01-01T01:00:00+01:00", "2020-01-01T00:00:00.000Z")],
)
def test_sent_at_is_canonicalised_when_the_event_has_no_timestamp(normaliser, sent_at, expected):
    # With neither timestamp nor originalTimestamp, sentAt went downstream unchecked, as sent.
    # Found by the fuzz test (the first once the crashes were fixed).
    out = routed_one(normaliser, {"type": "identify", "userId": "u1", "anonymousId": "u1", "sentAt": sent_at})
    assert out["sentAt"] == expected


@pytest.mark.parametrize("sent_at", ["yesterday", "0001-01-01T00:00:00+01:00", 5, "2026-11-22T10:00:00.²²²Z"])
def test_an_invalid_sent_at_is_rejected_even_without_a_timestamp(normaliser, sent_at):
    assert rejected_one(normaliser, track(sentAt=sent_at))


def test_millis_and_text_agrees_with_millis_of():
    for text in ["2026-11-22T10:00:00.123Z", "2026-11-22T12:00:00.123+02:00", "0999-01-01"]:
        ms, canonical = millis_and_text(text)
        assert ms == millis_of(text) == millis_of(canonical) and is_canonical(canonical)


# -- nesting past the encoder's limit (orjson writes 254 levels, parses 1024) ----------------------


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("inner", ["null", "[]", "{}"])
def test_nesting_depth_counts_as_orjson_does(kind, inner):
    for depth in (MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1):
        value = orjson.loads(nest(depth, inner, kind))
        fits = nesting_depth(value) <= MAX_DEPTH
        try:
            orjson.dumps(value)
            written = True
        except orjson.JSONEncodeError:
            written = False
        assert fits == written, (depth, inner, kind)


def test_an_event_at_the_limit_is_routed_and_one_past_it_rejected(normaliser):
    # The event object is a level, properties another: properties' contents may nest 252 more.
    # Without a messageId, so the id is derived from it too: deriving it used to put the event in a
    # list, one level deeper (TypeError "Recursion limit reached", found by the fuzz test).
    at_limit = b'{"type":"track","userId":"u","event":"E","properties":{"a":' + nest(MAX_DEPTH - 2) + b"}}"
    assert nesting_depth(orjson.loads(at_limit)) == MAX_DEPTH
    assert routed_one(normaliser, at_limit)["messageId"].startswith("sw-")
    past = b'{"type":"track","userId":"u","event":"E","properties":{"a":' + nest(MAX_DEPTH - 1) + b"}}"
    assert rejected_one(normaliser, past) == f"event is nested {MAX_DEPTH + 1} levels deep; the limit is 254 levels"
    batch = b'{"batch":[{"type":"track","userId":"u","event":"E","properties":{"a":' + nest(MAX_DEPTH - 2) + b"}}]}"
    assert normaliser.process(batch, KAFKA_TS, *AT).routed


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        # Found by the fuzz test: orjson.dumps raised TypeError in the id, the envelope and the codec.
        (b'{"type":' + nest(300) + b"}", "nested 301 levels"),
        (b'{"type":"track","userId":"u","event":"E","context":' + nest(600, "1", "dict") + b"}", "nested 601 levels"),
        (b'{"type":"track","userId":"u","event":"E","messageId":"m","traits":' + nest(1000) + b"}", "nested 1001"),
    ],
)
def test_a_single_event_nested_past_the_limit_is_rejected_with_its_bytes(normaliser, payload, reason):
    result = normaliser.process(payload, KAFKA_TS, *AT)
    assert [(r.index, r.value) for r in result.rejected] == [(None, payload)]
    assert reason in result.rejected[0].reason and "the limit is 254 levels" in result.rejected[0].reason


def test_a_deep_batch_item_is_rejected_alone_and_its_dead_letter_replays(normaliser):
    deep_item = b'{"a":' * 300 + b"null" + b"}" * 300  # found by the fuzz test: {"batch":[{"a":{"a":...}}]}
    deep_list = nest(300)  # found by the fuzz test: a non-object item, dead-lettered with orjson.dumps
    good = orjson.dumps(track(event="good"))
    payload = b'{"batch":[' + b",".join([good, deep_item, deep_list, good]) + b'],"context":{"ip":"10.0.0.1"}}'
    result = normaliser.process(payload, KAFKA_TS, *AT)
    assert [r.event["event"] for r in result.routed] == ["good", "good"]
    by_index = {r.index: r for r in result.rejected}
    assert set(by_index) == {1, 2}
    assert "nested 300 levels" in by_index[1].reason  # the item, with the batch context merged in
    assert orjson.loads(by_index[1].value) == {**orjson.loads(deep_item), "context": {"ip": "10.0.0.1"}}
    assert by_index[2].reason == "batch item must be an object, got array"
    assert orjson.loads(by_index[2].value) == orjson.loads(deep_list)


def test_a_deep_batch_context_is_refused_before_merging(normaliser):
    # deep_merge recursed along both contexts: RecursionError at ~1000 levels.
    context = nest(1000, "1", "dict")
    payload = (
        b'{"batch":[{"type":"track","userId":"u","event":"E","context":' + context + b'}],"context":' + context + b"}"
    )
    with pytest.raises(InvalidPayload, match="batch `context`: event is nested 1001 levels deep"):
        parse(payload)
    result = normaliser.process(payload, KAFKA_TS, *AT)
    assert [(r.index, r.value) for r in result.rejected] == [(None, payload)]
    # A shared context one level short of the limit still goes into every event.
    fits = b'{"batch":[{"type":"track","userId":"u","event":"E"}],"context":' + nest(MAX_DEPTH - 2, "1", "dict") + b"}"
    assert len(normaliser.process(fits, KAFKA_TS, *AT).routed) == 1


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        {"a": [1, 2.5, None, True, "x\u00e9\U0001f600", {"b": {}}], "c": -(2**63)},
        [[], [{}], "\u0000"],
        18446744073709551615,
    ],
)
def test_dumps_iteratively_writes_what_orjson_writes(value):
    assert dumps_iteratively(value) == orjson.dumps(value)
    deep = orjson.loads(nest(900, orjson.dumps(value).decode(), "dict"))
    assert orjson.loads(dumps_any(deep)) == deep


# -- enrichers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    ["81.2.69.142\u0000", "\u0000", "1" * 30_000, "81.2.69.142".translate(str.maketrans("0123456789", ARABIC_INDIC))],
)
def test_ips_that_are_not_addresses_get_no_location(normaliser, ip):
    # maxminddb raises TypeError (not ValueError) for an embedded NUL; long strings were cache keys.
    out = routed_one(normaliser, track(context={"ip": ip}))
    assert "location" not in out["context"] and out["context"]["ip"] == ip


@pytest.mark.parametrize(
    ("device_id", "expected"),
    [("dev-9", "dev-9"), (42, "42"), (4.0, "4"), ({"nested": 1}, None), ([1], None), (True, None), ("x" * 1025, None)],
)
def test_only_a_usable_device_id_becomes_the_anonymous_id(normaliser, device_id, expected):
    out = routed_one(normaliser, track(context={"device": {"id": device_id}}))
    assert out["anonymousId"] == (expected or anonymous_id_for_user("u1"))


# -- containment: whatever else goes wrong stays with its event ---------------------------------


def test_an_exception_in_an_enricher_rejects_its_event_and_nothing_else(enrichers):
    def fragile(event):
        if event.get("event") == "poison":
            raise RuntimeError("boom \ud800")  # a lone surrogate: the reason must still be a header

    normaliser = Normaliser(ALL, IdentityMap(1000), [*enrichers, fragile])
    batch = {
        "batch": [
            track(event="before"),
            {"type": "track", "userId": "u9", "anonymousId": "a9", "event": "poison"},
            track(event="after"),
        ]
    }
    result = normaliser.process(orjson.dumps(batch), KAFKA_TS, *AT)
    assert [r.event["event"] for r in result.routed] == ["before", "after"]
    [rejected] = result.rejected
    assert rejected.index == 1 and rejected.reason.startswith("RuntimeError: boom")
    rejected.reason.encode()
    assert orjson.loads(rejected.value)["event"] == "poison"
    # All or nothing: the failed event taught the identity map nothing and published no link.
    assert result.links == [] and normaliser.identities.get("a9") is None
    assert routed_one(normaliser, track(event="later"))["event"] == "later"  # and it goes on


def test_an_exception_in_the_codec_or_routing_is_contained(normaliser, monkeypatch):
    real = normaliser.codec.encode

    def encode(event, extra=None):
        if event.get("event") == "poison":
            raise ValueError("cannot encode")
        return real(event, extra)

    monkeypatch.setattr(normaliser.codec, "encode", encode)
    result = normaliser.process(orjson.dumps(track(event="poison")), KAFKA_TS, *AT)
    assert [(r.index, r.reason) for r in result.rejected] == [(None, "ValueError: cannot encode")]
    monkeypatch.setattr("worker.normalize.pipeline.destinations_for", lambda *_: 1 / 0)
    assert rejected_one(normaliser, track()) == "ZeroDivisionError: division by zero"


def test_an_exception_while_parsing_rejects_the_whole_payload(normaliser, monkeypatch):
    def broken(_value):
        raise KeyError("surprise")

    monkeypatch.setattr("worker.normalize.pipeline.envelope.parse", broken)
    result = normaliser.process(b'{"type":"track"}', KAFKA_TS, *AT)
    assert [(r.index, r.value, r.reason) for r in result.rejected] == [
        (None, b'{"type":"track"}', "KeyError: 'surprise'")
    ]


# -- message ids: one per client call, the same for the same record -----------------------------


def test_identical_calls_without_a_message_id_get_distinct_ids(normaliser):
    # The id was a hash of the content only: Amberflo deduped the second call away (undercount).
    body = orjson.dumps(track(event="Billed", properties={"units": 1}))
    first = routed_one(normaliser, body, at=("t.segment.raw", 0, 10))["messageId"]
    second = routed_one(normaliser, body, at=("t.segment.raw", 0, 11))["messageId"]
    assert first != second
    assert routed_one(normaliser, body, at=("t.segment.raw", 0, 10))["messageId"] == first  # reprocessed
    batch = orjson.dumps({"batch": [track(event="Billed")] * 3})
    ids = [r.event["messageId"] for r in normaliser.process(batch, KAFKA_TS, "t.segment.raw", 0, 12).routed]
    assert len(set(ids)) == 3
    assert ids == [r.event["messageId"] for r in normaliser.process(batch, KAFKA_TS, "t.segment.raw", 0, 12).routed]


def test_a_given_message_id_is_kept(normaliser):
    body = orjson.dumps(track(messageId="client-1"))
    assert routed_one(normaliser, body, at=("t.segment.raw", 0, 1))["messageId"] == "client-1"
    assert routed_one(normaliser, body, at=("t.segment.raw", 5, 99))["messageId"] == "client-1"
