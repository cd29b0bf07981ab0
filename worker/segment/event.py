"""The shape of a normalised Segment event, as the normaliser writes it and every sink reads it.

It is Segment's own JSON shape (https://segment.com/docs/connections/spec/common/), after
normalisation, so destination mappings can be written and tested against Segment's documented
examples:

- `type` is one of EVENT_TYPES; `messageId` is always set (filled deterministically if absent);
- `anonymousId` is always set; `userId` is set when known (possibly filled from the identity map);
- `timestamp` (skew-corrected), `originalTimestamp`, `receivedAt` are ISO-8601 UTC strings with
  millisecond precision ending in `Z`; `sentAt` likewise when the client sent one;
- `properties`, `traits`, `context`, `integrations` are always dicts (possibly empty);
- `event` (track), `name` (page/screen), `groupId` (group), `previousId` (alias), `category`
  (page) are set only for the types that carry them;
- `context.location`, `context.device`, `context.os`, `context.browser` may have been filled by
  enrichment; `context.bot` is true when the user agent is a known bot.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
EventType = Literal["track", "identify", "page", "screen", "group", "alias"]


class SegmentEvent(TypedDict, total=False):
    type: EventType
    messageId: str
    userId: str
    anonymousId: str
    event: str
    name: str
    category: str
    groupId: str
    previousId: str
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: dict[str, Any]
    integrations: dict[str, Any]
    timestamp: str
    originalTimestamp: str
    sentAt: str
    receivedAt: str
    channel: str
    version: int


def partition_key(event: SegmentEvent) -> str:
    """Key on every internal topic: userId, else anonymousId, so one person stays on one partition."""
    return event.get("userId") or event.get("anonymousId") or ""
