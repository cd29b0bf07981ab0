"""Golden tests for the Amplitude HTTP V2 mapping and response classification.

Response bodies are the documented ones (Amplitude HTTP V2 reference, "Response Format"), plus the
`events_with_invalid_id_lengths` / `silenced_*` fields Amplitude's SDKs handle.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.destinations.amplitude import AmplitudeConfig, AmplitudeDestination, make
from worker.destinations.base import Item, Outcome, Skip, Unmappable, Verdict
from worker.segment.event import SegmentEvent

TIMESTAMP = "2024-05-01T12:00:00.123Z"
TIME_MS = 1714564800123

IOS_CONTEXT: dict[str, Any] = {
    "device": {
        "id": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB",
        "type": "ios",
        "manufacturer": "Apple",
        "model": "iPhone7,2",
        "brand": "Apple",
    },
    "os": {"name": "iPhone OS", "version": "8.1.3"},
    "network": {"carrier": "T-Mobile US"},
    "locale": "en-US",
    "location": {
        "country": "United States",
        "region": "CA",
        "city": "San Francisco",
        "latitude": 40.2964197,
        "longitude": -76.9411617,
    },
    "ip": "8.8.8.8",
    "app": {"version": "3.0.1"},
    "library": {"name": "analytics-ios", "version": "4.1.0"},
    "traits": {"plan": "pro"},
}


def segment(**fields: Any) -> SegmentEvent:
    base: dict[str, Any] = {
        "messageId": "msg-0001",
        "anonymousId": "anon-0001",
        "timestamp": TIMESTAMP,
        "properties": {},
        "traits": {},
        "context": {},
        "integrations": {},
    }
    base.update(fields)
    return base  # type: ignore[return-value]


def destination(**config: Any) -> AmplitudeDestination:
    return make(AmplitudeConfig(api_key="amp-key", **config))


def mapped(event: SegmentEvent, **config: Any) -> list[dict[str, Any]]:
    return [item.payload for item in destination(**config).map_event(event)]


def test_track_golden_with_context_and_revenue() -> None:
    event = segment(
        type="track",
        userId="user-2019",
        event="Order Completed",
        properties={
            "revenue": 89.99,
            "price": 29.99,
            "quantity": 3,
            "productId": "SKU-001",
            "revenueType": "Purchase",
            "coupon": "SPRING",
        },
        context=IOS_CONTEXT,
    )
    assert mapped(event) == [
        {
            "user_id": "user-2019",
            "device_id": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB",
            "event_type": "Order Completed",
            "time": TIME_MS,
            "insert_id": "msg-0001",
            "platform": "ios",
            "os_name": "iPhone OS",
            "os_version": "8.1.3",
            "device_brand": "Apple",
            "device_manufacturer": "Apple",
            "device_model": "iPhone7,2",
            "carrier": "T-Mobile US",
            "language": "en-US",
            "country": "United States",
            "region": "CA",
            "city": "San Francisco",
            "location_lat": 40.2964197,
            "location_lng": -76.9411617,
            "ip": "8.8.8.8",
            "app_version": "3.0.1",
            "library": "analytics-ios/4.1.0",
            "event_properties": {
                "revenue": 89.99,
                "price": 29.99,
                "quantity": 3,
                "productId": "SKU-001",
                "revenueType": "Purchase",
                "coupon": "SPRING",
            },
            "revenue": 89.99,
            "price": 29.99,
            "quantity": 3,
            "productId": "SKU-001",
            "revenueType": "Purchase",
            "user_properties": {"$set": {"plan": "pro"}},
        }
    ]


def test_track_item_carries_dedupe_id_and_user() -> None:
    (item,) = destination().map_event(segment(type="track", userId="user-2019", event="A"))
    assert item == Item(endpoint="events", payload=item.payload, dedupe_id="msg-0001", user="user-2019")


def test_device_id_falls_back_to_anonymous_id_and_user_to_device() -> None:
    (item,) = destination().map_event(segment(type="track", event="A", context={"userAgent": "Mozilla/5.0"}))
    assert item.payload["device_id"] == "anon-0001"
    assert "user_id" not in item.payload
    assert item.payload["platform"] == "Web"
    assert item.user == "anon-0001"


def test_revenue_from_snake_case_and_string_numbers_without_price_drops_product_fields() -> None:
    event = segment(
        type="track",
        userId="user-1",
        event="Refund",
        properties={"revenue": "-1.99", "product_id": "p-9", "revenue_type": "Refund"},
    )
    (payload,) = mapped(event)
    assert (payload["revenue"], payload["productId"], payload["revenueType"]) == (-1.99, "p-9", "Refund")
    (no_money,) = mapped(segment(type="track", userId="user-1", event="Viewed", properties={"productId": "p"}))
    assert "productId" not in no_money and "revenue" not in no_money


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("page", "Pricing", "Viewed Pricing Page"),
        ("page", None, "Loaded a Page"),
        ("screen", "Home", "Viewed Home Screen"),
        ("screen", None, "Loaded a Screen"),
    ],
)
def test_page_and_screen_naming(kind: str, name: str | None, expected: str) -> None:
    fields: dict[str, Any] = {"type": kind, "userId": "user-1", "properties": {"path": "/pricing"}}
    if name:
        fields["name"] = name
    (payload,) = mapped(segment(**fields))
    assert payload["event_type"] == expected
    assert payload["event_properties"] == ({"path": "/pricing", "name": name} if name else {"path": "/pricing"})


def test_page_category_becomes_a_property() -> None:
    (payload,) = mapped(segment(type="page", userId="user-1", name="Pricing", category="Docs"))
    assert payload["event_properties"] == {"name": "Pricing", "category": "Docs"}


def test_identify_sets_traits_with_dollar_set() -> None:
    event = segment(
        type="identify",
        userId="user-2019",
        traits={"email": "a@b.co", "plan": "premium"},
        context={"traits": {"plan": "free", "company": "Initech"}},
    )
    (payload,) = mapped(event)
    assert payload["event_type"] == "$identify"
    assert payload["user_properties"] == {"$set": {"email": "a@b.co", "plan": "premium", "company": "Initech"}}
    assert "event_properties" not in payload


def test_group_joins_the_group_and_sets_group_properties() -> None:
    event = segment(
        type="group",
        userId="user-2019",
        groupId="acme-inc",
        traits={"groupType": "company", "name": "Acme", "employees": 120},
    )
    membership, group_identify = destination().map_event(event)
    assert membership.payload["event_type"] == "$identify"
    assert membership.payload["groups"] == {"company": "acme-inc"}
    assert "user_properties" not in membership.payload  # a group's traits are not the user's
    assert group_identify.payload["event_type"] == "$groupidentify"
    assert group_identify.payload["groups"] == {"company": "acme-inc"}
    assert group_identify.payload["group_properties"] == {"$set": {"name": "Acme", "employees": 120}}
    # Amplitude dedupes by insert_id: the second event must not repeat the first one's.
    assert membership.payload["insert_id"] == "msg-0001"
    assert group_identify.payload["insert_id"] == "msg-0001:groupidentify"
    assert group_identify.dedupe_id == "msg-0001:groupidentify"


def test_group_without_traits_defaults_group_type_and_sends_one_event() -> None:
    (payload,) = mapped(segment(type="group", userId="user-2019", groupId="g-77"))
    assert payload["groups"] == {"group": "g-77"}


def test_group_without_group_id_is_invalid() -> None:
    with pytest.raises(Unmappable, match="groupId"):
        mapped(segment(type="group", userId="user-2019"))


def test_alias_is_skipped_with_a_reason() -> None:
    with pytest.raises(Skip, match="alias"):
        mapped(segment(type="alias", userId="user-2019", previousId="anon-0001"))


def test_track_without_name_and_bad_timestamp_are_invalid() -> None:
    with pytest.raises(Unmappable, match="event name"):
        mapped(segment(type="track", userId="user-1"))
    with pytest.raises(Unmappable, match="timestamp"):
        mapped(segment(type="track", userId="user-1", event="A", timestamp="yesterday"))


def test_short_ids_are_sent_as_they_are_for_the_api_to_judge() -> None:
    (payload,) = mapped(segment(type="track", userId="u1", anonymousId="a1", event="A"))
    assert (payload["user_id"], payload["device_id"]) == ("u1", "a1")


def test_event_and_property_mapping() -> None:
    event = segment(
        type="track",
        userId="user-1",
        event="Purchase",
        properties={"plan_type": "premium", "amount": 3},
        context={"traits": {"first_name": "Ada"}},
    )
    (payload,) = mapped(
        event,
        event_mapping={"Purchase": "order_completed"},
        property_mapping={"plan_type": "PLAN", "first_name": "FIRSTNAME"},
    )
    assert payload["event_type"] == "order_completed"
    assert payload["event_properties"] == {"PLAN": "premium", "amount": 3}
    assert payload["user_properties"] == {"$set": {"FIRSTNAME": "Ada"}}


def test_mappings_and_min_id_length_from_environment_json() -> None:
    env: dict[str, str] = {}
    env["AMPLITUDE_API_KEY"] = "env-key"
    env["AMPLITUDE_MIN_ID_LENGTH"] = "1"
    env["AMPLITUDE_EVENT_MAPPING"] = '{"Sign Up": "customer_created"}'
    env["AMPLITUDE_PROPERTY_MAPPING"] = '{"email": "EMAIL"}'
    config = AmplitudeConfig.from_sources(env)
    assert config.event_mapping == {"Sign Up": "customer_created"}
    assert config.property_mapping == {"email": "EMAIL"}
    assert config.min_id_length == 1
    assert config.api_key is not None and "env-key" not in repr(config)


def test_defaults() -> None:
    env: dict[str, str] = {}
    config = AmplitudeConfig.from_sources(env)
    assert (config.base_url, config.events_per_second, config.min_id_length) == (
        "https://api2.amplitude.com",
        1000,
        None,
    )
    endpoint = make(config).endpoints["events"]
    assert (endpoint.method, endpoint.path, endpoint.max_items) == ("POST", "/2/httpapi", 1000)
    assert endpoint.max_bytes < 1_000_000


def test_encode_body_with_and_without_min_id_length() -> None:
    items = destination().map_event(segment(type="track", userId="user-1", event="A"))
    plain = orjson.loads(destination().encode(destination().endpoints["events"], items).body)
    assert plain == {"api_key": "amp-key", "events": [items[0].payload]}
    with_option = destination(min_id_length=1)
    request = with_option.encode(with_option.endpoints["events"], items)
    assert orjson.loads(request.body)["options"] == {"min_id_length": 1}
    assert (request.method, request.base, request.path) == ("POST", "default", "/2/httpapi")
    assert request.headers["Content-Type"] == "application/json"


# -- classify ---------------------------------------------------------------------------------

USERS = ["user-aaaa", "user-bbbb", "user-cccc", "user-dddd"]


def batch() -> list[Item]:
    d = destination()
    return [
        d.map_event(segment(type="track", userId=user, anonymousId=f"device-{i}", event="A", messageId=f"m{i}"))[0]
        for i, user in enumerate(USERS)
    ]


def classify(status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> Outcome:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    d = destination()
    return d.classify(d.endpoints["events"], batch(), status, raw, headers or {})


def verdicts(outcome: Outcome) -> list[Verdict]:
    return [outcome.for_item(i).verdict for i in range(len(USERS))]


def test_classify_success() -> None:
    body = {"code": 200, "events_ingested": 4, "payload_size_bytes": 900, "server_upload_time": 1396381378123}
    assert verdicts(classify(200, body)) == [Verdict.OK] * 4


def test_classify_400_invalid_and_missing_fields_by_index() -> None:
    body = {
        "code": 400,
        "error": "Invalid field values on some events",
        "events_with_invalid_fields": {"time": [1]},
        "events_with_missing_fields": {"event_type": [3]},
    }
    outcome = classify(400, body)
    assert verdicts(outcome) == [Verdict.RESEND, Verdict.PERMANENT, Verdict.RESEND, Verdict.PERMANENT]
    assert "invalid field time" in outcome.for_item(1).reason
    assert "missing field event_type" in outcome.for_item(3).reason


def test_classify_400_invalid_id_lengths_and_silenced() -> None:
    body = {
        "code": 400,
        "error": "Invalid id length for user_id or device_id",
        "events_with_invalid_id_lengths": {"device_id": [0]},
        "silenced_devices": ["device-2"],
        "silenced_events": [2],
    }
    outcome = classify(400, body)
    assert verdicts(outcome) == [Verdict.PERMANENT, Verdict.RESEND, Verdict.PERMANENT, Verdict.RESEND]
    assert "device_id shorter than min_id_length" in outcome.for_item(0).reason
    assert "silenced" in outcome.for_item(2).reason


def test_classify_400_ignores_indexes_outside_the_request() -> None:
    body = {"code": 400, "error": "x", "events_with_invalid_fields": {"time": [99, -1, "2"]}}
    assert verdicts(classify(400, body)) == [Verdict.PERMANENT] * 4  # nothing usable: the whole request


def test_classify_other_400_is_permanent_for_all() -> None:
    body = {"code": 400, "error": "Request missing required field", "missing_field": "events"}
    outcome = classify(400, body)
    assert verdicts(outcome) == [Verdict.PERMANENT] * 4
    assert "missing_field" in outcome.default.reason


def test_classify_invalid_api_key_retries_rather_than_dead_lettering_everything() -> None:
    outcome = classify(400, {"code": 400, "error": "Invalid API key: amp-key"})
    assert verdicts(outcome) == [Verdict.RETRY] * 4
    assert "AMPLITUDE_API_KEY" in outcome.default.reason


def test_classify_413_splits() -> None:
    assert verdicts(classify(413, {"code": 413, "error": "Payload too large"})) == [Verdict.SPLIT] * 4


def test_classify_429_throttles_only_the_named_users_and_devices() -> None:
    body = {
        "code": 429,
        "error": "Too many requests for some devices and users",
        "eps_threshold": 30,
        "throttled_devices": {"device-2": 31},
        "throttled_users": {"user-aaaa": 40},
        # no throttled_events: the users/devices alone must pick the items out
    }
    outcome = classify(429, body)
    assert verdicts(outcome) == [Verdict.THROTTLED, Verdict.RESEND, Verdict.THROTTLED, Verdict.RESEND]
    assert outcome.for_item(0).retry_after == 30.0  # the documented pause when no Retry-After came


def test_classify_429_daily_quota_and_retry_after_header() -> None:
    body = {
        "code": 429,
        "error": "Too many requests for some devices and users",
        "exceeded_daily_quota_users": {"user-bbbb": 500200},
        "exceeded_daily_quota_devices": {"device-3": 500900},
    }
    outcome = classify(429, body, {"retry-after": "5"})
    assert verdicts(outcome) == [Verdict.RESEND, Verdict.THROTTLED, Verdict.RESEND, Verdict.THROTTLED]
    assert outcome.for_item(1).retry_after == 5.0
    assert "daily quota" in outcome.for_item(3).reason


def test_classify_429_by_throttled_event_index_only() -> None:
    body = {"code": 429, "error": "Too many requests for some devices and users", "throttled_events": [3]}
    assert verdicts(classify(429, body)) == [Verdict.RESEND] * 3 + [Verdict.THROTTLED]


def test_classify_plain_429_retries_the_request() -> None:
    outcome = classify(429, b"Too Many Requests", {"Retry-After": "2"})
    assert verdicts(outcome) == [Verdict.RETRY] * 4
    assert outcome.default.retry_after == 2.0


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_classify_transient_statuses_retry(status: int) -> None:
    assert verdicts(classify(status, b"")) == [Verdict.RETRY] * 4


def test_event_without_message_id_is_invalid_rather_than_sent_without_insert_id() -> None:
    event = segment(type="track", userId="user-1", event="A")
    del event["messageId"]
    with pytest.raises(Unmappable, match="messageId"):
        mapped(event)
