"""ISO-8601 timestamps: parsing what clients send, formatting the canonical UTC form, skew fixing."""

from __future__ import annotations

import re
import time
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
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is in year 0 in UTC
        raise InvalidTimestamp(f"timestamp is outside the years 0001-9999 in UTC: {value[:64]!r}") from None


def millis(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def from_millis(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def format_iso(dt: datetime) -> str:
    """Canonical form: UTC, millisecond precision, `Z` suffix (what Segment itself emits)."""
    # isoformat is C and ~10x faster than strftime; on a UTC datetime it ends in "+00:00".
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="milliseconds")[:-6] + "Z"


_SECOND_PREFIXES: dict[int, str] = {}  # epoch second -> "YYYY-MM-DDTHH:MM:SS"; events cluster in few seconds
# The instants canonical text can name: 0001-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z.
MIN_MILLIS = -62_135_596_800_000
MAX_MILLIS = 253_402_300_799_999


def iso_from_millis(ms: int) -> str:
    """Canonical text of epoch milliseconds, without building a datetime (this runs per event).
    Raises InvalidTimestamp outside the years 0001-9999 (which no canonical text can name)."""
    second, milli = divmod(ms, 1000)
    prefix = _SECOND_PREFIXES.get(second)
    if prefix is None:
        if not MIN_MILLIS <= ms <= MAX_MILLIS:
            raise InvalidTimestamp(f"{ms} ms since the epoch is outside the years 0001-9999")
        if len(_SECOND_PREFIXES) >= 4096:
            _SECOND_PREFIXES.clear()
        t = time.gmtime(second)  # not strftime: glibc's %Y does not zero-pad years before 1000
        prefix = _SECOND_PREFIXES[second] = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        )
    return f"{prefix}.{milli:03d}Z"


_PREFIX_SECONDS: dict[str, int] = {}  # the reverse: "YYYY-MM-DDTHH:MM:SS" -> epoch second (valid ones only)


# Every position checked, digits ASCII only: str.isdigit() also accepts superscripts (which int()
# refuses) and Arabic-Indic digits (which int() reads, so they would pass through as "canonical"),
# and fromisoformat() also accepts other ISO shapes ("2026-W47-7T10:00:00").
_CANONICAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_canonical_match = _CANONICAL.fullmatch


def is_canonical(text: str) -> bool:
    """Already `YYYY-MM-DDTHH:MM:SS.mmmZ`, the form most SDKs send (and Segment emits)."""
    return len(text) == 24 and _canonical_match(text) is not None


def _canonical_millis(text: str) -> int:
    """Epoch milliseconds of a string `is_canonical` accepted, through a cache of its second."""
    second = _PREFIX_SECONDS.get(text[:19])
    if second is None:
        second = millis(parse_iso(text[:19] + "Z")) // 1000  # validates the date and time
        if len(_PREFIX_SECONDS) >= 4096:
            _PREFIX_SECONDS.clear()
        _PREFIX_SECONDS[text[:19]] = second
    return second * 1000 + int(text[20:23])


# "000".."999" -> their value: the milliseconds of a canonical text, checked and read in one lookup.
_MILLI_DIGITS = {f"{n:03d}": n for n in range(1000)}


def _seen_canonical_millis(value: str) -> int | None:
    """Epoch milliseconds of a canonical text on a second already seen, else None (then the caller
    takes the full check). Several times an event, in the normaliser and in the sinks: a second
    already seen holds only prefixes that passed the full check, and the milliseconds must be three
    ASCII digits, so this accepts exactly what is_canonical does, without the regular expression."""
    if len(value) == 24 and value[19] == "." and value[23] == "Z":
        second = _PREFIX_SECONDS.get(value[:19])
        milli = _MILLI_DIGITS.get(value[20:23])
        if second is not None and milli is not None:
            return second * 1000 + milli
    return None


def _millis_if_canonical(value: object) -> int | None:
    """Epoch milliseconds of a canonical text (the fast path first, then the regular expression),
    else None: what millis_of and millis_and_text both try before a full parse."""
    if not isinstance(value, str):
        return None
    ms = _seen_canonical_millis(value)
    if ms is None and is_canonical(value):
        ms = _canonical_millis(value)
    return ms


def millis_of(value: object) -> int:
    """Epoch milliseconds of an ISO-8601 string. Canonical strings take a cached fast path with no
    datetime (this runs several times per event); anything else is parsed in full."""
    ms = _millis_if_canonical(value)
    return ms if ms is not None else millis(parse_iso(value))


def canonical_text(text: str, ms: int) -> str:
    """`text` if it already is in canonical form, else the canonical text of `ms`."""
    return text if is_canonical(text) else iso_from_millis(ms)


def millis_and_text(value: object) -> tuple[int, str]:
    """Epoch milliseconds and canonical text of an ISO-8601 string: millis_of and canonical_text in
    one, checking the shape once (the normaliser's per-field call). Raises InvalidTimestamp."""
    ms = _millis_if_canonical(value)
    if ms is not None:
        return ms, value  # type: ignore[return-value]  # canonical, so a str
    ms = millis(parse_iso(value))
    return ms, iso_from_millis(ms)


def to_millis(value: str) -> int:
    """Epoch milliseconds of an ISO-8601 string; what destination mappings use for `time` fields."""
    return millis(parse_iso(value))


def correct_skew(original_ms: int, sent_ms: int | None, received_ms: int) -> int:
    """Segment's clock-skew correction: timestamp = receivedAt - (sentAt - originalTimestamp), in ms.

    The device clock may be wrong, but the interval between when the event happened and when the
    batch was sent is measured on that same clock, so subtracting it from the server's receipt time
    gives a timestamp on the server's clock. Without sentAt there is nothing to correct against.
    """
    if sent_ms is None:
        return original_ms
    return received_ms - (sent_ms - original_ms)
