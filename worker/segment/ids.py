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


def deterministic_message_id(event: dict[str, Any]) -> str:
    stable = {k: v for k, v in event.items() if k not in _VOLATILE}
    digest = hashlib.blake2b(orjson.dumps(stable, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
    return f"sw-{uuid.UUID(bytes=digest)}"


def anonymous_id_for_user(user_id: str) -> str:
    """A stable anonymousId for an event that came with only a userId (same user, same id, every time)."""
    return str(uuid.uuid5(_ANONYMOUS_NAMESPACE, user_id))
