import pytest

from worker.segment.validate import InvalidEvent, canonical


def test_canonical_fills_empty_maps_and_coerces_numeric_ids():
    event, extra = canonical({"type": "identify", "userId": 42, "traits": None, "version": 2, "writeKey": "secret"})
    assert event == {
        "type": "identify",
        "userId": "42",
        "properties": {},
        "traits": {},
        "context": {},
        "integrations": {},
    }
    assert extra == {"version": 2}  # writeKey never travels downstream


def test_unknown_top_level_fields_are_carried_as_extra():
    _event, extra = canonical({"type": "track", "userId": "u", "event": "E", "custom": {"x": 1}})
    assert extra == {"custom": {"x": 1}}


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"type": "purchase", "userId": "u"}, "`type` must be one of"),
        ({"userId": "u"}, "`type` must be one of"),
        ({"type": "track", "event": "E"}, "either `userId` or `anonymousId` is required"),
        ({"type": "track", "userId": "", "anonymousId": None, "event": "E"}, "either `userId` or `anonymousId`"),
        ({"type": "track", "userId": "u"}, "track requires a non-empty `event` name"),
        ({"type": "track", "userId": "u", "event": 5}, "`event` must be a string"),
        ({"type": "track", "userId": {"id": 1}, "event": "E"}, "`userId` must be a string, got dict"),
        ({"type": "track", "userId": True, "event": "E"}, "`userId` must be a string, got bool"),
        ({"type": "track", "userId": "u", "event": "E", "properties": [1]}, "`properties` must be an object"),
        ({"type": "identify", "userId": "u", "traits": "x"}, "`traits` must be an object"),
        ({"type": "track", "userId": "u", "event": "E", "context": 1}, "`context` must be an object"),
        ({"type": "group", "userId": "u"}, "group requires `groupId`"),
        ({"type": "alias", "userId": "u"}, "alias requires `previousId` and `userId`"),
        ({"type": "alias", "anonymousId": "a", "previousId": "p"}, "alias requires `previousId` and `userId`"),
        ({"type": "track", "userId": "u" * 2000, "event": "E"}, "the limit is 1024"),
    ],
)
def test_invalid_events_have_a_reason(event, reason):
    with pytest.raises(InvalidEvent, match=reason):
        canonical(event)
