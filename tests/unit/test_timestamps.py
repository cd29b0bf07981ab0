from datetime import UTC, datetime, timedelta

import pytest

from worker.segment.timestamps import InvalidTimestamp, correct_skew, format_iso, parse_iso, to_millis


def test_skew_correction_uses_the_devices_own_interval():
    # The device clock is 1 hour fast: it says the event happened at 11:00:00 and was sent at 11:00:10.
    original = parse_iso("2026-11-22T11:00:00Z")
    sent = parse_iso("2026-11-22T11:00:10Z")
    received = parse_iso("2026-11-22T10:00:12Z")  # the server's clock
    assert format_iso(correct_skew(original, sent, received)) == "2026-11-22T10:00:02.000Z"


def test_without_sent_at_nothing_is_corrected():
    original = parse_iso("2026-11-22T11:00:00Z")
    assert correct_skew(original, None, original + timedelta(hours=3)) == original


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T10:00:00Z", "2026-11-22T10:00:00.000Z"),
        ("2026-11-22T12:00:00.123456+02:00", "2026-11-22T10:00:00.123Z"),
        ("2026-11-22T10:00:00", "2026-11-22T10:00:00.000Z"),  # naive means UTC
        ("2026-11-22", "2026-11-22T00:00:00.000Z"),
    ],
)
def test_parse_and_format(text, expected):
    assert format_iso(parse_iso(text)) == expected


@pytest.mark.parametrize("value", ["yesterday", "", 1732270000, None, "2026-13-45T00:00:00Z"])
def test_invalid_timestamps(value):
    with pytest.raises(InvalidTimestamp):
        parse_iso(value)


def test_to_millis():
    assert to_millis("1970-01-01T00:00:01.5Z") == 1500
    assert format_iso(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00.000Z"
