"""Ids the normaliser fills in, deterministically, so re-processing the same input yields the same ids
(and so destinations dedupe a replay instead of counting it twice)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson

# Fields that differ between two deliveries of the same event (an SDK retry re-stamps sentAt; the
# collector stamps receivedAt per request), so they must not feed the id.
_VOLATILE = ("sentAt", "receivedAt", "writeKey")
_ANONYMOUS_NAMESPACE = uuid.UUID("6f1c9f55-3a43-4c1e-9a0a-5e8b1f0c2d17")


def derived_message_id(event: dict[str, Any], topic: str, partition: int, offset: int, index: int) -> str:
    """The messageId of an event that came without one: a hash of where it was read (topic,
    partition, offset, position in its batch envelope) and of what it says.

    The coordinates make it one id per client call: two calls with the same body (or two identical
    items of one batch) are two different events, and a destination's dedupe must count both.
    Re-processing the same record (a rebalance, a restart, a fresh consumer group) reads the same
    coordinates and the same bytes, so it gets the same id and is deduped. The content keeps ids
    apart should coordinates ever repeat (a topic deleted and re-created starts again at offset 0).
    """
    stable = {k: v for k, v in event.items() if k not in _VOLATILE}
    digest = hashlib.blake2b(digest_size=16)
    # A JSON array is self-delimiting, so the two texts cannot run into each other; the event is not
    # put inside it, which would nest it a level deeper than the encoder's limit allows for.
    digest.update(orjson.dumps([topic, partition, offset, index]))
    digest.update(orjson.dumps(stable, option=orjson.OPT_SORT_KEYS))
    h = digest.hexdigest()  # laid out as str(uuid.UUID(bytes=digest.digest())), without building the UUID
    return f"sw-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def anonymous_id_for_user(user_id: str) -> str:
    """A stable anonymousId for an event that came with only a userId (same user, same id, every time)."""
    return str(uuid.uuid5(_ANONYMOUS_NAMESPACE, user_id))
