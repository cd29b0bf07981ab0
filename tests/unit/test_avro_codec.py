import pytest

from worker.avro_codec import EventCodec, FlatRecordCodec, SingleObjectCodec, UnknownSchema, load_schema

EVENT = {
    "type": "page",
    "messageId": "m" * 3000,  # long enough for multi-byte varint lengths
    "anonymousId": "a-1",
    "userId": "ü-ser",
    "name": "Ünïcode ✓",
    "timestamp": "2026-11-22T10:00:00.000Z",
    "originalTimestamp": "2026-11-22T10:00:00.000Z",
    "receivedAt": "2026-11-22T10:00:01.000Z",
    "properties": {"a": [1, 2, {"b": None}]},
    "traits": {},
    "context": {"ip": "1.1.1.1"},
    "integrations": {"All": True},
}


def test_the_fast_codec_writes_exactly_what_fastavro_writes_and_reads_it_back():
    reference = SingleObjectCodec(load_schema())
    fast = FlatRecordCodec(load_schema())
    record = {**EVENT, "properties": '{"a":1}', "traits": "{}", "context": "{}", "integrations": "{}", "extra": "{}"}
    assert fast.encode(record) == reference.encode(record)
    assert fast.decode(reference.encode(record)) == reference.decode(fast.encode(record))


def test_json_fields_are_written_as_the_json_string_fastavro_would_write():
    import orjson

    reference = SingleObjectCodec(load_schema())
    fast = FlatRecordCodec(load_schema(), json_fields=("properties", "traits", "context", "integrations", "extra"))
    as_objects = {**EVENT, "extra": {"v": 2}}
    as_strings = {k: orjson.dumps(v).decode() if isinstance(v, dict) else v for k, v in as_objects.items()}
    assert fast.encode(as_objects) == reference.encode(as_strings)
    decoded = fast.decode(reference.encode(as_strings))
    assert {k: v for k, v in decoded.items() if v is not None} == as_objects


def test_event_round_trip_with_extra():
    codec = EventCodec()
    data = codec.encode(EVENT, {"version": 2})
    assert data[:2] == b"\xc3\x01"
    assert codec.decode(data) == (EVENT, {"version": 2})


def test_records_from_an_unknown_schema_are_refused():
    data = bytearray(EventCodec().encode(EVENT))
    data[5] ^= 0xFF  # another fingerprint
    with pytest.raises(UnknownSchema, match="fingerprint"):
        EventCodec().decode(bytes(data))
    with pytest.raises(UnknownSchema, match="marker"):
        EventCodec().decode(b'{"json": true}')


def test_missing_required_field_is_an_error():
    with pytest.raises(ValueError, match="required"):
        FlatRecordCodec(load_schema()).encode({"type": "track"})
