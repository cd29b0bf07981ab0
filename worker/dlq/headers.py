"""Dead-letter records: the original bytes and key, plus headers saying what failed and where it came from.

Header names are part of the public contract (docs/CONTRACT.md#dead-letter-headers): operators filter
and replay by them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from worker.segment.timestamps import format_iso


class Kind(StrEnum):
    INVALID = "invalid"  # the input can never be processed (bad JSON, missing required field)
    PERMANENT = "permanent"  # the destination rejected it for good (4xx)
    EXHAUSTED = "exhausted"  # transient failures outlasted the retry budget


MAX_REASON_CHARS = 1000


def dead_letter_headers(
    *,
    error: str,
    kind: Kind,
    original_topic: str,
    original_partition: int,
    original_offset: int,
    destination: str,
    attempts: int = 1,
    http_status: int | None = None,
    failed_at: datetime | None = None,
    extra: dict[str, str] | None = None,
) -> list[tuple[str, bytes]]:
    headers = {
        "error": error[:MAX_REASON_CHARS],
        "error_kind": str(kind),
        "original_topic": original_topic,
        "original_partition": str(original_partition),
        "original_offset": str(original_offset),
        "attempts": str(attempts),
        "failed_at": format_iso(failed_at or datetime.now(UTC)),
        "destination": destination,
    }
    if http_status is not None:
        headers["http_status"] = str(http_status)
    headers.update(extra or {})
    return [(name, value.encode()) for name, value in headers.items()]


def header_map(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    return {name: (value or b"").decode("utf-8", "replace") for name, value in headers or []}
