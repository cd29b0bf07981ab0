"""Raw producer payloads: a single event or a `{"batch": [...]}` envelope, exactly as written to `segment.raw`.

Limits are Segment's (HTTP Tracking API): 32 KB an event, 500 KB a batch request; and an event
may nest at most MAX_DEPTH levels, what orjson can write back out (it parses up to 1024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
# orjson writes at most 254 levels of arrays and objects (the 255th raises "Recursion limit
# reached") but parses up to 1024. Every event is written out again (the Avro record's JSON fields,
# its id, a batch item's dead letter), so an event deeper than this is refused here, with a reason.
MAX_DEPTH = 254

# Envelope fields that apply to every event of a batch unless the event has its own.
_BATCH_DEFAULTS = ("sentAt", "integrations", "receivedAt", "channel")


class InvalidPayload(ValueError):
    """The whole payload is unusable; it is dead-lettered as it came, with this reason."""


@dataclass
class RejectedEvent:
    """An input the normaliser dead-letters as `invalid`: a whole payload, or one item of a batch."""

    index: int | None  # position in the batch; None for a whole payload
    value: bytes  # what a replay sends back to segment.raw (a batch item with the batch context merged)
    reason: str


class Envelope:
    """A payload split into its events. A plain slotted class, not a dataclass: one is built for
    every raw message, and the dataclass's keyword and default-factory handling cost twice as much."""

    __slots__ = ("encoded", "events", "indexes", "is_batch", "rejected")

    def __init__(self, events: list[dict[str, Any]], indexes: list[int], is_batch: bool = False) -> None:
        self.events = events
        self.indexes = indexes  # batch position of each event
        self.encoded: list[bytes] = []  # each batch event as JSON (what a dead letter keeps)
        self.rejected: list[RejectedEvent] = []
        self.is_batch = is_batch


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins; nested dicts are merged, so an event's `context.app` keeps the batch's `context.device`."""
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            merged[key] = deep_merge(below, value)
        else:
            merged[key] = value
    return merged


def parse(value: bytes | None) -> Envelope:
    """Decode and split a raw payload. Raises InvalidPayload; per-event problems land in `rejected`."""
    if not value:
        raise InvalidPayload("empty message")
    if len(value) > MAX_BATCH_BYTES:
        raise InvalidPayload(f"payload is {len(value)} bytes; the limit is {MAX_BATCH_BYTES} bytes a batch")
    try:
        document = orjson.loads(value)  # rejects invalid UTF-8 and nesting deeper than 1024
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"malformed JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {json_type(document)}")
    if "batch" not in document:
        if len(value) > MAX_EVENT_BYTES:
            raise InvalidPayload(f"event is {len(value)} bytes; the limit is {MAX_EVENT_BYTES} bytes an event")
        # Nesting needs an opening bracket a level, so counting them is a cheap bound; walk only past it.
        if value.count(b"[") + value.count(b"{") > MAX_DEPTH and (depth := nesting_depth(document)) > MAX_DEPTH:
            raise InvalidPayload(too_deep(depth))
        return Envelope([document], [0])
    return _split_batch(document)


def _split_batch(document: dict[str, Any]) -> Envelope:
    batch = document["batch"]
    if not isinstance(batch, list):
        raise InvalidPayload(f"`batch` must be an array, got {json_type(batch)}")
    shared_context = document.get("context")
    if shared_context is not None and not isinstance(shared_context, dict):
        raise InvalidPayload(f"batch `context` must be an object, got {json_type(shared_context)}")
    # It lands one level down in every event; checked first because deep_merge recurses along it.
    if batch and shared_context and (depth := nesting_depth(shared_context)) >= MAX_DEPTH:
        raise InvalidPayload(f"batch `context`: {too_deep(depth + 1)} in every event of the batch")
    defaults = {k: document[k] for k in _BATCH_DEFAULTS if k in document}
    envelope = Envelope([], [], is_batch=True)
    for index, item in enumerate(batch):
        if not isinstance(item, dict):
            envelope.rejected.append(
                RejectedEvent(index, dumps_any(item), f"batch item must be an object, got {json_type(item)}")
            )
            continue
        event = {**defaults, **item}
        if shared_context:
            own = item.get("context")
            if own is None:
                event["context"] = dict(shared_context)  # a copy: enrichment adds keys per event
            elif isinstance(own, dict):
                event["context"] = deep_merge(shared_context, own)
            # any other `context` is left for validation to reject
        try:
            encoded = orjson.dumps(event)
        except orjson.JSONEncodeError:
            depth = nesting_depth(event)
            if depth <= MAX_DEPTH:
                raise  # not the nesting: a bug, for the normaliser's per-payload containment
            envelope.rejected.append(RejectedEvent(index, dumps_any(event), too_deep(depth)))
            continue
        if len(encoded) > MAX_EVENT_BYTES:
            envelope.rejected.append(
                RejectedEvent(
                    index, encoded, f"event is {len(encoded)} bytes; the limit is {MAX_EVENT_BYTES} bytes an event"
                )
            )
            continue
        envelope.events.append(event)
        envelope.indexes.append(index)
        envelope.encoded.append(encoded)
    return envelope


def nesting_depth(value: object) -> int:
    """Levels of arrays and objects, as orjson counts them ([] is 1, [[]] and {"a": []} are 2).
    Iterative: parsed JSON may be 1024 levels deep, past Python's recursion limit."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest


def too_deep(depth: int) -> str:
    return f"event is nested {depth} levels deep; the limit is {MAX_DEPTH} levels"


class _Raw(bytes):
    """Already-encoded JSON text on dumps_any's stack (parsed JSON never holds bytes)."""


def dumps_any(value: object) -> bytes:
    """orjson.dumps for any parsed JSON value, including ones nested deeper than orjson writes
    (what a dead letter of a too-deep batch item keeps): those are written iteratively."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return dumps_iteratively(value)


def dumps_iteratively(value: object) -> bytes:
    """The same bytes as orjson.dumps, with an explicit stack instead of recursion."""
    out: list[bytes] = []
    stack: list[object] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, _Raw):
            out.append(node)
        elif isinstance(node, dict) and node:
            parts: list[object] = []
            for i, (key, child) in enumerate(node.items()):
                parts += (_Raw((b"," if i else b"{") + orjson.dumps(key) + b":"), child)
            stack += (_Raw(b"}"), *reversed(parts))
        elif isinstance(node, list) and node:
            parts = []
            for i, child in enumerate(node):
                parts += (_Raw(b"," if i else b"["), child)
            stack += (_Raw(b"]"), *reversed(parts))
        else:
            out.append(orjson.dumps(node))  # a scalar, {} or []
    return b"".join(out)


def json_type(value: object) -> str:
    """JSON's name for a parsed value's type, for error messages people read."""
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        type(None): "null",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)
