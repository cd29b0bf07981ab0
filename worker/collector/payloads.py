"""From a request's JSON to the messages written to `segment.raw`, one an event: shape checks, the
server's stamps (`receivedAt`, `context.ip`), Segment's size limits, and each message's key.

One message an event, keyed by that event's userId else anonymousId, because the key decides the
partition and the partition decides the order the normaliser instances write events out in: a
whole batch under one key would put every user in it on the partition of whoever came first.
A batch's event is written as the normaliser's own split of the batch made it (its
`worker.segment.envelope.parse`: the batch's `context`, `sentAt`, `integrations`... merged in),
wrapped in a one-event `{"batch": [...]}` envelope, so the merge logic lives in one place and the
normaliser treats the event exactly as it would have inside the whole batch.

Everything is checked before anything is written, and the limits are checked on the stamped
bytes with the normaliser's own parser (`worker.segment.envelope.parse`), so a request answered
200 is never dead-lettered later for its size or shape: nor for its `type`, which decides how the
normaliser handles an event, so an event without one it knows is a 400 (`check_type`).

What is stored is orjson's re-encoding of what orjson read, so a body is refused (400) when that
round trip cannot keep it unchanged: JSON nested deeper than orjson writes (254 levels, where it
reads 1024) and integers outside the 64-bit range (which orjson reads as floats, so another
number would be stored). Any other unusable body (not JSON, not UTF-8, not an object, wrong
shape) is a 400 too: a body is never a reason for a 5xx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import orjson

from worker.collector.auth import BODY_FIELD
from worker.collector.responses import exceeds_payload_limit, invalid_json, malformed
from worker.segment.envelope import (
    MAX_BATCH_BYTES,
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    Envelope,
    InvalidPayload,
    json_type,
    parse,
)
from worker.segment.event import EVENT_TYPES  # the normaliser's list: the one the type is checked against
from worker.segment.timestamps import format_iso


class Shape(Enum):
    EVENT = "event"  # /v1/track ... : one event, `type` from the path
    BATCH = "batch"  # /v1/batch, /v1/import: `{"batch": [...]}`
    EITHER = "either"  # Jitsu's /api/v1/segment: one event (its own `type`) or a batch envelope

    @property
    def payload_limit(self) -> int:
        """The largest payload Segment accepts on such an endpoint (bytes after decompression)."""
        return MAX_EVENT_BYTES if self is Shape.EVENT else MAX_BATCH_BYTES


@dataclass(frozen=True)
class RawMessage:
    """One message for `segment.raw`: one event (bare, or in a one-event batch envelope)."""

    value: bytes
    key: str | None


def received_at_now() -> str:
    """Server time, ISO-8601 UTC with milliseconds and `Z`: what Segment puts in `receivedAt`."""
    return format_iso(datetime.now(UTC))


# The integers orjson keeps as integers; it reads any other integer literal as a float.
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**64 - 1
_MIN_DIGITS_OUT_OF_RANGE = len(str(MIN_INTEGER)) - 1  # 19: no shorter integer literal can be out of range
_LONG_DIGIT_RUN = re.compile(rb"\d{%d}" % _MIN_DIGITS_OUT_OF_RANGE)
# In JSON orjson accepted: a string (skipped whole, so digits inside strings do not count), or an
# integer literal of 19 digits or more (not the fraction or exponent of a number, not a float).
_LONG_INTEGER_OR_STRING = re.compile(
    rb'"(?:[^"\\]++|\\.)*+"|(?<![\d.eE+\-])-?\d{%d,}+(?![.eE])' % _MIN_DIGITS_OUT_OF_RANGE
)


def decode_document(payload: bytes) -> dict[str, Any]:
    if not payload.strip():
        raise invalid_json("empty body; expected a JSON object")
    try:
        document = orjson.loads(payload)  # also rejects invalid UTF-8 and nesting deeper than 1024
    except orjson.JSONDecodeError as exc:
        raise invalid_json(str(exc)) from None
    if not isinstance(document, dict):
        raise malformed(f"body must be a JSON object, got {json_type(document)}")
    _check_integers(payload)
    return document


def _check_integers(payload: bytes) -> None:
    """400 for an integer literal orjson could not keep (it became a float). `payload` is valid JSON."""
    if not _LONG_DIGIT_RUN.search(payload):  # the usual case: no digit run long enough, no scan
        return
    for token in _LONG_INTEGER_OR_STRING.finditer(payload):
        text = token.group()
        if text[:1] == b'"':
            continue
        if len(text.lstrip(b"-")) > len(str(MAX_INTEGER)) or not MIN_INTEGER <= int(text) <= MAX_INTEGER:
            shown = text if len(text) <= 40 else text[:37] + b"..."
            raise malformed(
                f"integer {shown.decode()} is outside the 64-bit range [{MIN_INTEGER}, {MAX_INTEGER}]; "
                "send it as a string"
            )


def encode(document: Any) -> bytes:
    """JSON of a document orjson read, or 400 when orjson cannot write it back (too deep)."""
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError as exc:
        raise malformed(
            f"body cannot be stored: {exc} (JSON is stored at most {MAX_DEPTH} levels deep, "
            "a batch's envelope included)"
        ) from None


def build_messages(
    document: dict[str, Any], shape: Shape, event_type: str | None, received_at: str, ip: str | None
) -> list[RawMessage]:
    """The messages to write, one an event, in the request's order; none for an empty batch
    (nothing to store, nothing to refuse). Stamps `document` in place."""
    if shape is Shape.BATCH or (shape is Shape.EITHER and "batch" in document):
        return _batch_messages(document, received_at, ip)
    return [_event_message(document, event_type, received_at, ip)]


def _event_message(event: dict[str, Any], event_type: str | None, received_at: str, ip: str | None) -> RawMessage:
    if "batch" in event:
        # The normaliser would take it for a batch envelope; on a typed endpoint that is a client bug.
        raise malformed("a `batch` array belongs on /v1/batch, not on a single-event endpoint")
    if event_type is not None:
        event["type"] = event_type  # Segment: the endpoint decides the type
    else:
        check_type(event)
    stamp(event, received_at, ip)
    value = encode(event)
    if len(value) > MAX_EVENT_BYTES:
        raise exceeds_payload_limit(
            f"event is {len(value)} bytes with receivedAt and context.ip; the limit is {MAX_EVENT_BYTES} bytes"
        )
    return RawMessage(value, key_of(event))


def check_type(event: dict[str, Any], where: str = "") -> None:
    """400 for an event whose `type` is not one the normaliser routes: it would be answered 200 and
    then dead-lettered. Neither Segment nor Jitsu gives a missing type a default (Segment requires
    it on every /v1/batch item; Jitsu stores the event typeless, which a Segment-spec pipeline
    cannot), so none is guessed here. The message is the normaliser's own
    (`worker.segment.validate.canonical`). Only the type is checked at the door: the other
    per-event rules (a track's `event`, userId or anonymousId...) stay with the normaliser, which
    dead-letters that one event with its reason rather than refusing its whole batch."""
    kind = event.get("type")
    if kind not in EVENT_TYPES:
        raise malformed(f"{where}`type` must be one of {', '.join(EVENT_TYPES)}; got {str(kind)[:40]!r}")


def _batch_messages(document: dict[str, Any], received_at: str, ip: str | None) -> list[RawMessage]:
    batch = document.get("batch")
    if not isinstance(batch, list):
        raise malformed(f"`batch` must be an array of events, got {json_type(batch)}")
    for index, item in enumerate(batch):
        if not isinstance(item, dict):
            raise malformed(f"batch[{index}] must be an object, got {json_type(item)}")
        check_type(item, f"batch[{index}]: ")
    document.pop(BODY_FIELD, None)
    if not batch:
        return []
    # An IP in the batch's own context reaches every event when the normaliser merges it under
    # theirs; stamping the socket's IP on the events would override it.
    shared_context = document.get("context")
    batch_has_ip = isinstance(shared_context, dict) and shared_context.get("ip") is not None
    for item in batch:
        stamp(item, received_at, None if batch_has_ip else ip)
    envelope = _split_like_the_normaliser(encode(document))
    return [
        RawMessage(one_event_batch(encoded), key_of(event))
        for event, encoded in zip(envelope.events, envelope.encoded, strict=True)
    ]


def _split_like_the_normaliser(value: bytes) -> Envelope:
    """The batch as the normaliser splits it (limits checked on the whole of it, as it would), so
    each event is written already merged with the batch's fields, by the normaliser's own code."""
    if len(value) > MAX_BATCH_BYTES:
        raise exceeds_payload_limit(
            f"batch is {len(value)} bytes with receivedAt and context.ip; the limit is {MAX_BATCH_BYTES} bytes"
        )
    try:
        envelope = parse(value)
    except InvalidPayload as exc:  # e.g. a batch `context` that is not an object
        raise malformed(str(exc)) from None
    if envelope.rejected:  # items are objects (checked above), so these are events over 32 KB
        first = envelope.rejected[0]
        raise exceeds_payload_limit(f"batch[{first.index}]: {first.reason}")
    return envelope


def one_event_batch(encoded_event: bytes) -> bytes:
    """A batch envelope holding one already-merged event, and nothing else (its batch-level fields
    are in it already). Kept a batch rather than a bare event: a batch item may carry a field named
    `batch`, which the normaliser would take for an envelope if the item stood alone. Joined as
    bytes, not re-encoded: the envelope's two levels must not count against orjson's write depth
    (the normaliser re-encodes only the event, as it always has)."""
    return b'{"batch":[' + encoded_event + b"]}"


def stamp(event: dict[str, Any], received_at: str, ip: str | None) -> None:
    """What the server adds to every event: its own clock, and the client's IP unless the event has one."""
    event.pop(BODY_FIELD, None)  # the write key is a credential, not event data
    # Always replaced: receivedAt is the server's clock by definition, and clock-skew correction
    # (timestamp = receivedAt - (sentAt - originalTimestamp)) must not trust a client's value.
    event["receivedAt"] = received_at
    if ip is None:
        return
    context = event.get("context")
    if context is None:
        event["context"] = {"ip": ip}
    elif isinstance(context, dict) and context.get("ip") is None:
        context["ip"] = ip
    # any other `context` is left for the normaliser to dead-letter with a reason


def key_of(event: dict[str, Any]) -> str | None:
    """userId, else anonymousId: one person's events stay on one partition (docs/ARCHITECTURE.md#message-keys).
    Numbers are written as the normaliser's validation writes those ids (42.0 is "42"), so the
    same user has the same key whichever way a client spelled the id."""
    for field in ("userId", "anonymousId"):
        value = event.get(field)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):  # JSON has no NaN or infinity, so every float here is finite
            return str(int(value)) if value.is_integer() else str(value)
    return None
