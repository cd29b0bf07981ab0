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
MAX_ID_LENGTH = 1024


class InvalidEvent(ValueError):
    pass


def _identifier(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidEvent(f"`{name}` must be a string, got {type(value).__name__}")
    text = value if isinstance(value, str) else _number_text(value)
    if len(text) > MAX_ID_LENGTH:
        raise InvalidEvent(f"`{name}` is {len(text)} characters; the limit is {MAX_ID_LENGTH}")
    return text


def _number_text(value: int | float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


_ID_FIELDS = ("messageId", "userId", "anonymousId", "groupId", "previousId")
_KNOWN = frozenset(("type", *_ID_FIELDS, *MAP_FIELDS, *_STRING_FIELDS, *TIMESTAMP_FIELDS, *_DROPPED_FIELDS))


def canonical(event: dict[str, Any]) -> tuple[SegmentEvent, dict[str, Any]]:
    """Bring a freshly parsed event into canonical shape, in place; return it with the unknown
    top-level fields (removed from it) to carry as `extra`.

    In place because this runs for every event and the dict is ours (just parsed). Timestamps are
    left as the client sent them; worker.normalize fixes them against receivedAt.
    """
    kind = event.get("type")
    if kind not in EVENT_TYPES:
        raise InvalidEvent(f"`type` must be one of {', '.join(EVENT_TYPES)}; got {str(kind)[:40]!r}")
    unknown = event.keys() - _KNOWN
    extra = {name: event.pop(name) for name in unknown} if unknown else {}
    for name in _ID_FIELDS:
        value = event.get(name)
        if value is None or value == "":
            event.pop(name, None)
        elif value.__class__ is not str:
            event[name] = _identifier(name, value)
        elif len(value) > MAX_ID_LENGTH:
            raise InvalidEvent(f"`{name}` is {len(value)} characters; the limit is {MAX_ID_LENGTH}")
    for name in MAP_FIELDS:
        value = event.get(name)
        if value is None:
            event[name] = {}
        elif value.__class__ is not dict:
            raise InvalidEvent(f"`{name}` must be an object, got {type(value).__name__}")
    for name in _STRING_FIELDS:
        value = event.get(name)
        if value is None:
            event.pop(name, None)
        elif value.__class__ is not str:
            raise InvalidEvent(f"`{name}` must be a string, got {type(value).__name__}")
    for name in TIMESTAMP_FIELDS:
        if name in event and event[name] is None:
            del event[name]
    event.pop("writeKey", None)
    if "userId" not in event and "anonymousId" not in event:
        raise InvalidEvent("either `userId` or `anonymousId` is required")
    if kind == "track" and not event.get("event"):
        raise InvalidEvent("track requires a non-empty `event` name")
    if kind == "group" and "groupId" not in event:
        raise InvalidEvent("group requires `groupId`")
    if kind == "alias" and ("previousId" not in event or "userId" not in event):
        raise InvalidEvent("alias requires `previousId` and `userId`")
    return event, extra  # type: ignore[return-value]
