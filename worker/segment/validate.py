"""Validation and canonical form of one Segment event (https://segment.com/docs/connections/spec/).

`canonical` turns what a client sent into the normalised shape of worker.segment.event, or raises
InvalidEvent with a reason a person can act on. It is lenient where Segment's own API is (numeric
ids become strings, null maps become empty) and strict where a destination would fail later.
"""

from __future__ import annotations

from typing import Any

from worker.segment.event import EVENT_TYPES, SegmentEvent

MAP_FIELDS = ("properties", "traits", "context", "integrations")
TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
# Top-level fields of the spec we carry through as they are (strings).
_STRING_FIELDS = ("event", "name", "category", "channel")
# Credentials must not travel downstream; the collector has already checked them.
_DROPPED_FIELDS = ("writeKey",)
_KNOWN = {
    "type",
    "messageId",
    "userId",
    "anonymousId",
    "groupId",
    "previousId",
    "version",
    *MAP_FIELDS,
    *TIMESTAMP_FIELDS,
    *_STRING_FIELDS,
    *_DROPPED_FIELDS,
}
MAX_ID_LENGTH = 1024


class InvalidEvent(ValueError):
    pass


def _identifier(event: dict[str, Any], name: str) -> str | None:
    value = event.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidEvent(f"`{name}` must be a string, got {type(value).__name__}")
    text = value if isinstance(value, str) else _number_text(value)
    if len(text) > MAX_ID_LENGTH:
        raise InvalidEvent(f"`{name}` is {len(text)} characters; the limit is {MAX_ID_LENGTH}")
    return text


def _number_text(value: int | float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def canonical(event: dict[str, Any]) -> tuple[SegmentEvent, dict[str, Any]]:
    """Return (the event in canonical shape, unknown top-level fields to carry as `extra`).

    Timestamps are left as the client sent them; worker.normalize fixes them against receivedAt.
    """
    kind = event.get("type")
    if kind not in EVENT_TYPES:
        raise InvalidEvent(f"`type` must be one of {', '.join(EVENT_TYPES)}; got {str(kind)[:40]!r}")
    out: dict[str, Any] = {"type": kind}
    for name in ("messageId", "userId", "anonymousId", "groupId", "previousId"):
        value = _identifier(event, name)
        if value is not None:
            out[name] = value
    if "userId" not in out and "anonymousId" not in out:
        raise InvalidEvent("either `userId` or `anonymousId` is required")
    for name in MAP_FIELDS:
        value = event.get(name)
        if value is None:
            out[name] = {}
        elif isinstance(value, dict):
            # context gets a copy: enrichment adds to it, and the caller's dict may be shared or re-sent
            out[name] = dict(value) if name == "context" else value
        else:
            raise InvalidEvent(f"`{name}` must be an object, got {type(value).__name__}")
    for name in _STRING_FIELDS:
        value = event.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidEvent(f"`{name}` must be a string, got {type(value).__name__}")
        out[name] = value
    for name in TIMESTAMP_FIELDS:
        value = event.get(name)
        if value is not None:
            out[name] = value
    if kind == "track" and not out.get("event"):
        raise InvalidEvent("track requires a non-empty `event` name")
    if kind == "group" and "groupId" not in out:
        raise InvalidEvent("group requires `groupId`")
    if kind == "alias" and ("previousId" not in out or "userId" not in out):
        raise InvalidEvent("alias requires `previousId` and `userId`")
    extra = {k: v for k, v in event.items() if k not in _KNOWN}
    if "version" in event:
        extra["version"] = event["version"]
    return out, extra  # type: ignore[return-value]
