"""ISO-8601 timestamps: parsing what clients send, formatting the canonical UTC form, skew fixing."""

from __future__ import annotations

from datetime import UTC, datetime


class InvalidTimestamp(ValueError):
    pass


def parse_iso(value: object) -> datetime:
    """Parse an ISO-8601 string (any offset, `Z` allowed, date-only allowed) into an aware UTC datetime."""
    if not isinstance(value, str) or not value:
        raise InvalidTimestamp(f"timestamp must be an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidTimestamp(f"not an ISO-8601 timestamp: {value[:64]!r}") from None
    if parsed.tzinfo is None:  # Segment treats naive timestamps as UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def millis(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def from_millis(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def format_iso(dt: datetime) -> str:
    """Canonical form: UTC, millisecond precision, `Z` suffix (what Segment itself emits)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def to_millis(value: str) -> int:
    """Epoch milliseconds of an ISO-8601 string; what destination mappings use for `time` fields."""
    return millis(parse_iso(value))


def correct_skew(original: datetime, sent_at: datetime | None, received_at: datetime) -> datetime:
    """Segment's clock-skew correction: timestamp = receivedAt - (sentAt - originalTimestamp).

    The device clock may be wrong, but the interval between when the event happened and when the
    batch was sent is measured on that same clock, so subtracting it from the server's receipt time
    gives a timestamp on the server's clock. Without sentAt there is nothing to correct against.
    """
    if sent_at is None:
        return original
    return received_at - (sent_at - original)
