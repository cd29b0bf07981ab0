"""worker.destinations.base: what a mapped Item holds while a sink keeps it."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import orjson
import pytest

from worker.destinations.base import Item, Unmappable, encoded_item, item_json, json_bytes, right_sized


def amplitude_like_payload(n: int) -> dict[str, Any]:
    """About 1.5 KB of JSON in the shape of a mapped Amplitude event: nested maps of short strings."""
    return {
        "event_type": "Product Viewed",
        "user_id": f"user-{n:05d}",
        "device_id": f"device-{n:05d}",
        "insert_id": f"message-{n:09d}",
        "time": 1_796_000_000_000 + n,
        "event_properties": {f"property_{k}": f"value {k} of event {n}" for k in range(20)},
        "user_properties": {"$set": {f"trait_{k}": f"trait {k} of user {n}" for k in range(10)}},
        "library": "analytics.js/2.11.1",
    }


def retained_bytes(make: Any, count: int) -> tuple[float, list[Any]]:
    """Bytes still allocated per object after `count` calls of `make(n)`, the objects kept alive."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make(n) for n in range(count)]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / count, kept


def test_a_mapped_item_keeps_about_its_json_length_in_memory() -> None:
    # The payload's dict is dropped and orjson's working buffer (rounded up, never shrunk: ten
    # times the JSON) is not what the item keeps. Before, one such item kept ~12 KB.
    per_item, items = retained_bytes(lambda n: encoded_item("events", amplitude_like_payload(n), f"m-{n}", "u"), 500)
    body = sum(len(item.body) for item in items) / len(items)
    assert body > 1_000
    assert per_item < body * 1.2 + 300, f"{per_item:.0f} bytes kept per item for {body:.0f} bytes of JSON"


def test_right_sized_copies_orjson_output_into_an_exact_allocation() -> None:
    payload = amplitude_like_payload(1)
    encoded = orjson.dumps(payload)
    per_copy, copies = retained_bytes(lambda _n: right_sized(orjson.dumps(payload)), 200)
    assert all(copy == encoded for copy in copies)
    assert per_copy < len(encoded) + 200
    per_plain, _ = retained_bytes(lambda _n: orjson.dumps(payload), 200)
    assert per_plain > per_copy * 2  # what right_sized is for: if orjson stops over-allocating, drop it


def test_a_mapped_items_payload_reads_back_from_its_bytes() -> None:
    payload = amplitude_like_payload(7)
    item = encoded_item("events", payload, "m-7", "user-00007")
    assert item.payload == payload
    assert item.body == orjson.dumps(payload)
    assert orjson.dumps(item_json(item)) == orjson.dumps(payload)
    assert item == Item("events", payload, "m-7", "user-00007")  # equal by what is sent
    assert item != Item("events", payload, "m-8", "user-00007")
    assert "m-7" in repr(item) and "Product Viewed" in repr(item)


def test_a_hand_made_item_keeps_its_payload_until_encode() -> None:
    payload = {"user_id": "u", "n": 2**70}  # beyond what orjson writes: encode, not the item, fails
    item = Item("events", payload, "m", "u")
    assert item.body is None and item.payload is payload
    with pytest.raises(TypeError):
        orjson.dumps(item_json(item))


def test_an_item_needs_a_payload_or_a_body() -> None:
    with pytest.raises(ValueError):
        Item("events", None, "m", "u")


def test_an_unencodable_payload_is_unmappable_with_the_reason() -> None:
    with pytest.raises(Unmappable, match="cannot be encoded as JSON"):
        json_bytes({"n": 2**70})
    with pytest.raises(Unmappable):
        encoded_item("events", {"text": "\ud800"}, "m")
