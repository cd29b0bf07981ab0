"""Golden tests for the Amplitude HTTP V2 mapping and response classification.

Response bodies are the documented ones (Amplitude HTTP V2 reference, "Response Format"), plus the
`events_with_invalid_id_lengths` / `silenced_*` fields Amplitude's SDKs handle.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.standin_helpers import serve_standin
from worker.destinations.amplitude import AmplitudeConfig, AmplitudeDestination, make
from worker.destinations.base import Item, Outcome, Skip, Unmappable, Verdict
from worker.segment.event import SegmentEvent
from worker.standins import amplitude as amplitude_standin
from worker.standins.faults import StandinState

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
            # Segment's iOS SDK's device.type "ios", cased as Amplitude's SDKs and Segment's Actions
            # Amplitude send it; device.id is the IDFV on iOS; no session given: -1.
            "platform": "iOS",
            "idfv": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB",
            "session_id": -1,
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


# -- issue 11: fields peers and Amplitude's SDKs send --------------------------------------------
#
# Expected values follow Amplitude's HTTP V2 reference ("Keys for the Event Argument"), cross-checked
# against rudder-transformer's am processor fixtures (test/integrations/destinations/am/processor/
# data.ts, cited by their description) and Segment's Actions Amplitude (packages/destination-actions/
# src/destinations/amplitude). Where we deliberately differ, docs/MAPPINGS.md#amplitude says why.

CHROME_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
)
IPHONE_SAFARI_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1"
)
DALVIK_UA = "Dalvik/2.1.0 (Linux; U; Android 9; AOSP on IA Emulator Build/PSR1.180720.117)"


def track(**fields: Any) -> dict[str, Any]:
    (payload,) = mapped(segment(type="track", userId="user-2019", event="A", **fields))
    return payload


def test_browser_event_is_web_not_the_ua_enrichers_form_factor() -> None:
    # As the normaliser leaves an analytics.js event: device/os/browser parsed from the user agent.
    # Old mapping: platform "desktop". rudder-transformer 'Test 16' (channel web) and Segment's
    # Actions Amplitude (library analytics.js) both send "Web", as Amplitude's browser SDK does.
    context = {
        "userAgent": CHROME_UA,
        "device": {"type": "desktop"},
        "os": {"name": "Windows", "version": "10"},
        "browser": {"name": "Chrome", "version": "120.0"},
        "library": {"name": "analytics.js", "version": "next-1.70.0"},
    }
    payload = track(context=context)
    assert payload["platform"] == "Web"
    assert (payload["os_name"], payload["os_version"]) == ("Windows", "10")
    assert not {"idfa", "idfv", "adid"} & payload.keys()


def test_mobile_browser_is_web_too_and_gets_no_attribution_ids() -> None:
    # UA enrichment of an iPhone's Safari: device.type "mobile", os iOS. Old mapping: "mobile".
    context = {
        "userAgent": IPHONE_SAFARI_UA,
        "device": {"type": "mobile", "manufacturer": "Apple", "model": "iPhone", "advertisingId": "AEBE52E7-03EE"},
        "os": {"name": "iOS", "version": "17.0"},
    }
    payload = track(context=context)
    assert payload["platform"] == "Web"
    assert not {"idfa", "idfv", "adid"} & payload.keys()


@pytest.mark.parametrize(
    ("device_type", "platform"),
    [
        ("ios", "iOS"),  # Segment's analytics-ios / analytics-swift
        ("android", "Android"),  # Segment's analytics-android / analytics-kotlin
        ("iOS", "iOS"),  # rudder-transformer 'Test 24'
        ("Android", "Android"),  # rudder-transformer 'Test 23'
        ("ipados", "iPadOS"),  # rudder-transformer 'Test 48' (which passes "ipados" through uncased)
        ("tvos", "tvOS"),  # rudder-transformer 'Test 49'
        ("watchos", "watchOS"),  # rudder-transformer 'Test 47'
        ("macos", "macOS"),
    ],
)
def test_app_platform_is_the_os_family_properly_cased(device_type: str, platform: str) -> None:
    assert track(context={"device": {"type": device_type}})["platform"] == platform


def test_app_event_without_device_type_takes_the_platform_from_the_os_not_from_the_user_agent() -> None:
    # An app's own HTTP client agent and OS, no device.type. Old mapping: "Web" (any userAgent was).
    context = {
        "userAgent": "MyApp/1.0 CFNetwork/1408.0.4 Darwin/22.5.0",
        "device": {"id": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB", "model": "iPhone15,2"},
        "os": {"name": "iOS", "version": "16.5"},
    }
    payload = track(context=context)
    assert payload["platform"] == "iOS"
    assert payload["idfv"] == "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB"


def test_android_event_enriched_from_its_dalvik_agent_is_android() -> None:
    # What the UA enricher makes of analytics-android's Dalvik agent when the event had no device/os
    # (rudder-transformer 'Test 23' carries the same agent). Old mapping: "mobile".
    context = {
        "userAgent": DALVIK_UA,
        "device": {"type": "mobile", "model": "AOSP on IA Emulator"},
        "os": {"name": "Android", "version": "9"},
        "library": {"name": "analytics-android", "version": "4.11.3"},
    }
    assert track(context=context)["platform"] == "Android"


def test_mobile_sdk_event_with_no_device_info_takes_the_platform_from_its_library() -> None:
    assert track(context={"library": {"name": "analytics-ios", "version": "4.1.0"}})["platform"] == "iOS"


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"library": {"name": "analytics-node", "version": "6.0.0"}},
        {"userAgent": "curl/8.0", "device": {"type": "desktop"}},  # the enricher's guess for curl
        {"device": {"type": "mobile"}, "os": {"name": "Windows Phone"}},
        {"device": {"type": {"not": "a string"}}, "library": {"name": ["x"]}, "os": {"name": 7}},
    ],
)
def test_no_platform_is_made_up_without_evidence(context: dict[str, Any]) -> None:
    assert "platform" not in track(context=context)


def test_ios_advertising_id_is_idfa_and_device_id_is_idfv() -> None:
    # rudder-transformer 'Test 25': device.type iOS, advertisingId -> idfa, device.id -> idfv.
    context = {
        "device": {
            "id": "0572f78fa49c648e",
            "type": "iOS",
            "model": "iPhone XR",
            "manufacturer": "Apple",
            "advertisingId": "1606e649-c97e-4d5f-a2ef-b81dbc66741a",
        },
        "os": {"name": "iOS", "version": "14.4.1"},
    }
    payload = track(context=context)
    assert {k: payload.get(k) for k in ("platform", "device_id", "idfa", "idfv", "adid")} == {
        "platform": "iOS",
        "device_id": "0572f78fa49c648e",
        "idfa": "1606e649-c97e-4d5f-a2ef-b81dbc66741a",
        "idfv": "0572f78fa49c648e",
        "adid": None,
    }


def test_ios_without_advertising_id_sends_only_idfv() -> None:
    # rudder-transformer 'Test 24' (adTrackingEnabled false, no advertisingId).
    payload = track(context={"device": {"id": "0572f78fa49c648e", "type": "iOS", "adTrackingEnabled": False}})
    assert (payload["idfv"], "idfa" in payload) == ("0572f78fa49c648e", False)


def test_android_advertising_id_is_adid_and_there_is_no_idfv() -> None:
    # rudder-transformer 'Test 23': device.type Android, advertisingId -> adid.
    context = {
        "device": {
            "id": "0572f78fa49c648e",
            "type": "Android",
            "advertisingId": "44c97318-9040-4361-8bc7-4eb30f665ca8",
        },
        "os": {"name": "Android", "version": "9"},
    }
    payload = track(context=context)
    assert payload["adid"] == "44c97318-9040-4361-8bc7-4eb30f665ca8"
    assert not {"idfa", "idfv"} & payload.keys()


def test_an_all_zero_advertising_id_is_no_id() -> None:
    # What iOS reports under Limit Ad Tracking / ATT and Android after the user deletes the ad id.
    # Peers send it; as idfa/adid it would make every such device one for attribution.
    zeros = "00000000-0000-0000-0000-000000000000"
    ios = track(context={"device": {"type": "ios", "id": "IDFV-1234", "advertisingId": zeros}})
    android = track(context={"device": {"type": "android", "advertisingId": zeros}})
    assert ("idfa" in ios, ios["idfv"], "adid" in android) == (False, "IDFV-1234", False)


@pytest.mark.parametrize(
    ("integrations", "context", "session_id"),
    [
        ({"Amplitude": {"session_id": 1714564700000}}, {}, 1714564700000),
        ({"Actions Amplitude": {"session_id": 1714564700000}}, {}, 1714564700000),
        # Segment's formatSessionId: a digit string is a number, any other text a date.
        ({"Actions Amplitude": {"session_id": "1714564700000"}}, {}, 1714564700000),
        ({"Actions Amplitude": {"session_id": "2024-05-01T11:58:20.000Z"}}, {}, 1714564700000),
        ({"Amplitude": {"session_id": 1714564700000.0}}, {}, 1714564700000),
        # rudder-transformer 'Test 65': context.sessionId "1662393792" -> 1662393792.
        ({}, {"sessionId": "1662393792"}, 1662393792),
        # The first source that holds a usable id wins; a bad one is skipped (rudder 'Test 67').
        ({"Amplitude": {"session_id": 1}, "Actions Amplitude": {"session_id": 2}}, {"sessionId": 3}, 1),
        ({"Amplitude": {"session_id": "x"}, "Actions Amplitude": {"session_id": 2}}, {}, 2),
        # rudder-transformer 'Test 68': a UUID is no session id -> -1.
        ({}, {"sessionId": "3049dc4c-5a95-4ccd-a3e7-d74a7e411f22"}, -1),
        ({}, {}, -1),
        ({"Amplitude": {"session_id": None}}, {}, -1),
        ({"Amplitude": {"session_id": True}}, {}, -1),
        ({"Amplitude": {"session_id": "nan"}}, {}, -1),
        ({"Amplitude": {"session_id": float("nan")}}, {}, -1),
        ({"Amplitude": {"session_id": float("inf")}}, {}, -1),
        ({"Amplitude": {"session_id": "1e999"}}, {}, -1),
        ({"Amplitude": {"session_id": 2**64}}, {}, -1),
        ({"Amplitude": {"session_id": "99999999999999999999"}}, {}, -1),
        ({"Amplitude": {"session_id": -5}}, {}, -1),
        ({"Amplitude": {"session_id": "-1"}}, {}, -1),
        ({"Amplitude": {"session_id": {"start": 1}}}, {}, -1),
        ({"Amplitude": "not an object"}, {}, -1),
        ({"Amplitude": {"session_id": "9999-12-31T23:59:59.999+00:00"}}, {}, 253402300799999),
        ({"Amplitude": {"session_id": "0001-01-01T00:00:00Z"}}, {}, -1),  # before 1970: not a session
    ],
)
def test_session_id_is_a_positive_integer_of_milliseconds_or_minus_one(
    integrations: dict[str, Any], context: dict[str, Any], session_id: int
) -> None:
    payload = track(integrations=integrations, context=context)
    assert payload["session_id"] == session_id
    assert type(payload["session_id"]) is int


def test_every_event_type_carries_a_session_id() -> None:
    session = {"Actions Amplitude": {"session_id": 1714564700000}}
    events = [
        segment(type="page", userId="user-1", name="Home", integrations=session),
        segment(type="screen", userId="user-1", name="Home", integrations=session),
        segment(type="identify", userId="user-1", traits={"plan": "pro"}, integrations=session),
        segment(type="group", userId="user-1", groupId="g-1", traits={"name": "G"}, integrations=session),
    ]
    for event in events:
        assert {p["session_id"] for p in mapped(event)} == {1714564700000}


def test_product_viewed_with_a_price_books_no_revenue() -> None:
    # Old mapping: top-level price 19.99 and quantity 2, so Amplitude booked 39.98 of revenue for a
    # product someone only looked at. Segment's Actions Amplitude (logEventV2) omits revenue fields
    # for every track but Order Completed; rudder-transformer adds them only when revenue is set.
    properties = {"product_id": "p-1", "price": 19.99, "quantity": 2, "name": "Monopoly"}
    payload = track(properties=properties)
    assert not {"revenue", "price", "quantity", "productId", "revenueType"} & payload.keys()
    assert payload["event_properties"] == properties


def test_order_with_revenue_carries_the_revenue_fields() -> None:
    # rudder-transformer 'Test 3' input (Order Completed, revenue 48, revenue_type, quantity 2, no price).
    # rudder sends price 48 / quantity 1 (price = revenue); we send what the event says, which books
    # the same 48 (HTTP V2: without price, revenue is the revenue).
    properties = {
        "tax": 2,
        "total": 27.5,
        "revenue": 48,
        "revenue_type": "Purchased",
        "quantity": 2,
        "currency": "USD",
        "order_id": "50314b8e9bcf000000000000",
    }
    payload = track(properties=properties)
    assert {k: payload.get(k) for k in ("revenue", "price", "quantity", "productId", "revenueType")} == {
        "revenue": 48.0,
        "price": None,
        "quantity": 2,
        "productId": None,
        "revenueType": "Purchased",
    }
    assert payload["event_properties"] == properties  # kept as they came (rudder deletes them)


@pytest.mark.parametrize(
    ("quantity", "sent"),
    [(2.5, 3), (2.4, 2), ("3.9", 4), (-2.5, -2), (0.5, 1), (7, 7), (2**62, 2**62), ("a few", None)],
)
def test_fractional_quantity_is_rounded_half_up_like_segment(quantity: Any, sent: int | None) -> None:
    # Segment's logPurchase: Math.round(quantity). Old mapping truncated ("3.9" -> 3).
    payload = track(properties={"revenue": 10, "price": 4, "quantity": quantity})
    assert payload.get("quantity") == sent


def test_revenue_that_is_not_a_number_is_no_revenue() -> None:
    payload = track(properties={"revenue": {"usd": 3}, "price": 4, "quantity": 1})
    assert not {"revenue", "price", "quantity"} & payload.keys()


def test_campaign_and_referrer_become_latest_and_initial_touch_user_properties() -> None:
    # Segment's Actions Amplitude (utm_properties / referrer -> $set and initial_* under $setOnce), as
    # Amplitude's SDKs record attribution. rudder-transformer 'Test 16' sends the campaign too, but at
    # the top level of user_properties, as utm_<key> (utm_name, utm_test) and without $setOnce.
    context = {
        "userAgent": CHROME_UA,
        "library": {"name": "analytics.js", "version": "next-1.70.0"},
        "campaign": {
            "name": "spring_sale",
            "source": "google",
            "medium": "cpc",
            "term": "running shoes",
            "content": "banner",
            "test": "other value",  # not a UTM parameter Amplitude knows
        },
        "page": {"url": "https://shop.example/", "referrer": "https://www.google.com/"},
        "traits": {"plan": "pro", "utm_source": "stale"},
    }
    (payload,) = mapped(segment(type="page", userId="user-2019", name="Home", context=context))
    assert payload["platform"] == "Web"
    assert payload["user_properties"] == {
        "$set": {
            "plan": "pro",
            "utm_source": "google",  # the event's campaign, not the cached trait
            "utm_medium": "cpc",
            "utm_campaign": "spring_sale",
            "utm_term": "running shoes",
            "utm_content": "banner",
            "referrer": "https://www.google.com/",
        },
        "$setOnce": {
            "initial_utm_source": "google",
            "initial_utm_medium": "cpc",
            "initial_utm_campaign": "spring_sale",
            "initial_utm_term": "running shoes",
            "initial_utm_content": "banner",
            "initial_referrer": "https://www.google.com/",
        },
    }


def test_referrer_alone_and_empty_campaign_values() -> None:
    context = {"campaign": {"source": "", "medium": None, "name": ["x"], "term": 42}, "page": {"referrer": "r.example"}}
    assert track(context=context)["user_properties"] == {
        "$set": {"utm_term": "42", "referrer": "r.example"},
        "$setOnce": {"initial_utm_term": "42", "initial_referrer": "r.example"},
    }
    assert "user_properties" not in track(context={"campaign": {"source": ""}, "page": {"referrer": ""}})
    assert "user_properties" not in track(context={"campaign": "google", "page": ["x"]})


def test_identify_and_group_record_the_campaign_too() -> None:
    context = {"campaign": {"source": "newsletter"}}
    (identify,) = mapped(segment(type="identify", userId="user-1", traits={"plan": "pro"}, context=context))
    assert identify["user_properties"] == {
        "$set": {"plan": "pro", "utm_source": "newsletter"},
        "$setOnce": {"initial_utm_source": "newsletter"},
    }
    membership, group_identify = mapped(
        segment(type="group", userId="user-1", groupId="g-1", traits={"name": "Acme"}, context=context)
    )
    assert membership["user_properties"] == {
        "$set": {"utm_source": "newsletter"},
        "$setOnce": {"initial_utm_source": "newsletter"},
    }
    assert "user_properties" not in group_identify  # the group's event says nothing about the user


def test_identify_without_traits_still_sets_an_empty_set() -> None:
    (payload,) = mapped(segment(type="identify", userId="user-1"))
    assert payload["user_properties"] == {"$set": {}}


# -- totality of the new fields, and what the stand-in makes of them ------------------------------

# tests/unit/test_sink_fuzz.py fuzzes whole events but not the paths this mapping now reads
# (integrations, campaign, page.referrer, advertisingId, channel): hostile values there, here.
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["nan", "1e999", "-1", "1714564700000", "2024-05-01T11:58:20Z", "Mozilla/5.0", "ios", "\ud800"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["track", "page", "screen", "identify", "group"]),
    session=HOSTILE,
    actions_session=HOSTILE,
    context_session=HOSTILE,
    campaign=st.one_of(HOSTILE, st.dictionaries(st.sampled_from(["name", "source", "term", "x"]), HOSTILE)),
    referrer=HOSTILE,
    device=st.dictionaries(st.sampled_from(["type", "id", "advertisingId"]), HOSTILE),
    os_name=HOSTILE,
    library=HOSTILE,
    user_agent=HOSTILE,
    channel=HOSTILE,
    quantity=HOSTILE,
    revenue=HOSTILE,
)
def test_new_fields_never_crash_the_mapping(
    kind: str,
    session: Any,
    actions_session: Any,
    context_session: Any,
    campaign: Any,
    referrer: Any,
    device: dict[str, Any],
    os_name: Any,
    library: Any,
    user_agent: Any,
    channel: Any,
    quantity: Any,
    revenue: Any,
) -> None:
    event = segment(
        type=kind,
        userId="user-2019",
        event="A",
        groupId="g-1",
        channel=channel,
        properties={"revenue": revenue, "quantity": quantity, "price": 1},
        traits={"name": "x"},
        integrations={"Amplitude": {"session_id": session}, "Actions Amplitude": {"session_id": actions_session}},
        context={
            "sessionId": context_session,
            "campaign": campaign,
            "page": {"referrer": referrer},
            "device": device,
            "os": {"name": os_name},
            "library": {"name": library},
            "userAgent": user_agent,
        },
    )
    try:
        items = destination().map_event(event)
    except (Skip, Unmappable):
        return
    for item in items:
        payload = item.payload
        session_id = payload["session_id"]
        assert type(session_id) is int and (session_id == -1 or 0 < session_id < 2**63)
        assert payload.get("platform") is None or isinstance(payload["platform"], str)
        for key in ("idfa", "idfv", "adid"):
            assert key not in payload or (isinstance(payload[key], str) and payload[key])
        quantity_sent = payload.get("quantity")
        assert quantity_sent is None or (type(quantity_sent) is int and -(2**63) <= quantity_sent < 2**63)


STANDIN_KEY = "amp-standin-key"


def test_the_standin_accepts_everything_the_mapping_now_sends() -> None:
    events = [
        segment(
            type="track",
            userId="user-2019",
            messageId="m-ios",
            event="Order Completed",
            properties={"revenue": 48, "price": 24, "quantity": 2.4, "productId": "p-1", "revenueType": "Purchase"},
            integrations={"Actions Amplitude": {"session_id": 1714564700000}},
            context={**IOS_CONTEXT, "device": {**IOS_CONTEXT["device"], "advertisingId": "AEBE52E7-03EE-455A"}},
        ),
        segment(
            type="page",
            messageId="m-web",
            name="Home",
            context={
                "userAgent": CHROME_UA,
                "campaign": {"source": "google", "name": "spring"},
                "page": {"referrer": "https://www.google.com/"},
            },
        ),
        segment(
            type="screen",
            userId="user-2020",
            messageId="m-android",
            name="Home",
            context={"device": {"type": "android", "advertisingId": "44c97318-9040-4361-8bc7-4eb30f665ca8"}},
        ),
    ]
    d = make(AmplitudeConfig(api_key=STANDIN_KEY))
    items = [item for event in events for item in d.map_event(event)]
    request = d.encode(d.endpoints["events"], items)
    state = StandinState("amplitude")

    async def post() -> tuple[int, dict[str, Any]]:
        async with (
            serve_standin(amplitude_standin.register, state, STANDIN_KEY) as base,
            aiohttp.ClientSession() as session,
            session.post(base + request.path, data=request.body, headers=dict(request.headers)) as response,
        ):
            return response.status, await response.json()

    status, body = asyncio.run(post())
    assert (status, body["events_ingested"]) == (200, 3), body
    assert sorted(state.received) == ["m-android", "m-ios", "m-web"]
    assert {k: state.received["m-ios"][k] for k in ("idfa", "idfv", "session_id", "quantity")} == {
        "idfa": "AEBE52E7-03EE-455A",
        "idfv": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB",
        "session_id": 1714564700000,
        "quantity": 2,
    }
    assert state.received["m-android"]["adid"] == "44c97318-9040-4361-8bc7-4eb30f665ca8"
