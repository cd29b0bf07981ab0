import os
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.segment.timestamps import (
    InvalidTimestamp,
    correct_skew,
    format_iso,
    from_millis,
    is_canonical,
    iso_from_millis,
    millis,
    millis_and_text,
    millis_of,
    parse_iso,
    to_millis,
)


def test_skew_correction_uses_the_devices_own_interval():
    # The device clock is 1 hour fast: it says the event happened at 11:00:00 and was sent at 11:00:10.
    original = to_millis("2026-11-22T11:00:00Z")
    sent = to_millis("2026-11-22T11:00:10Z")
    received = to_millis("2026-11-22T10:00:12Z")  # the server's clock
    assert iso_from_millis(correct_skew(original, sent, received)) == "2026-11-22T10:00:02.000Z"


def test_without_sent_at_nothing_is_corrected():
    original = to_millis("2026-11-22T11:00:00Z")
    assert correct_skew(original, None, original + 3_600_000) == original


@pytest.mark.parametrize("ms", [0, 999, 1_795_000_000_123, 1_795_000_000_999, 1_795_000_001_000])
def test_iso_from_millis_agrees_with_datetime(ms):
    assert iso_from_millis(ms) == format_iso(from_millis(ms))
    assert to_millis(iso_from_millis(ms)) == ms


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


@pytest.mark.parametrize(
    "text",
    ["2026-11-22T10:00:00.123Z", "2026-11-22T12:00:00.123+02:00", "2026-11-22T10:00:00Z", "2024-02-29T23:59:59.999Z"],
)
def test_millis_of_fast_path_agrees_with_the_full_parse(text):
    assert millis_of(text) == millis_of(text) == to_millis(text)


@pytest.mark.parametrize("text", ["2026-13-45T00:00:00.000Z", "2026-02-30T00:00:00.000Z", "2026-11-22T10:00:00.1a3Z"])
def test_millis_of_rejects_impossible_canonical_looking_strings(text):
    with pytest.raises(InvalidTimestamp):
        millis_of(text)


# -- millis_and_text's fast path accepts exactly what the full check does ---------------------------

_SEEN = "2026-11-22T10:00:00.123Z"  # its second is cached once read, so variants take the fast path


def _reference(text: str) -> tuple[int, str] | str:
    """What millis_and_text must return for `text`, by the slow road: a full parse and the regular
    expression (or the InvalidTimestamp it must raise, as a string)."""
    try:
        ms = millis(parse_iso(text))
    except InvalidTimestamp:
        return "invalid"
    return ms, text if is_canonical(text) else iso_from_millis(ms)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 23), st.sampled_from("0123456789.Z:-T +" + "\u0663\u00b9\uff11\u0000é")),
        max_size=3,
    )
)
def test_fuzz_millis_and_text_agrees_with_the_full_check(edits):
    millis_and_text(_SEEN)  # caches the second
    text = list(_SEEN)
    for position, char in edits:
        text[position] = char
    candidate = "".join(text)
    expected = _reference(candidate)
    for _twice in range(2):  # the second call finds the second cached, if the first cached it
        try:
            got: tuple[int, str] | str = millis_and_text(candidate)
        except InvalidTimestamp:
            got = "invalid"
        assert got == expected, candidate
        try:
            alone: int | str = millis_of(candidate)  # the sinks' call: the same fast path
        except InvalidTimestamp:
            alone = "invalid"
        assert alone == (expected if expected == "invalid" else expected[0]), candidate


@pytest.mark.parametrize(
    "text", ["2026-11-22T10:00:00.1\u06633Z", "2026-11-22T10:00:00.\u00b923Z", "2026-11-22T10:00:00.12 Z"]
)
def test_milliseconds_that_are_not_ascii_digits_are_refused_on_a_second_already_seen(text):
    millis_and_text(_SEEN)  # the second is cached: only the milliseconds differ
    with pytest.raises(InvalidTimestamp):
        millis_and_text(text)
    with pytest.raises(InvalidTimestamp):
        millis_of(text)
