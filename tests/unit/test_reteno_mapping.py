"""Golden tests for the Reteno mapping against the example payloads of Reteno's Amplitude integration
guide (docs/MAPPINGS.md#reteno).

The source document's payloads are FreeMarker templates fed by an Amplitude event (`input`). The tests keep
those templates verbatim, render them with one Amplitude input, and check that the Segment event
carrying the same facts maps to exactly that JSON. The only additions are the ones
docs/ARCHITECTURE.md#guarantees asks for (keyValue = messageId on events) and they are spelled out in each expectation.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest

from worker.config_loader import ConfigError
from worker.destinations.base import Item, Skip, Unmappable, Verdict
from worker.destinations.reteno import (
    CONTACTS,
    DEVICES,
    EVENTS,
    RetenoConfig,
    as_text,
    event_type_key,
    make,
)

# --- Reteno's templates (docs/MAPPINGS.md#reteno), verbatim -----------------------------------
# (the source document's Markdown escapes `\<#if` and `\[` removed)

SEED_DEVICE_TEMPLATE = """
{
<#if input.device_id??>
"deviceId": "${input.device_id}",
</#if>
<#if input.device_id??>
"externalUserId": "${input.user_id}",
</#if>
<#if input.os_name??>
"osType": "${input.os_name?upper_case}",
</#if>
<#if input.version_name??>
"appVersion": "${input.version_name}",
</#if>
<#if input.os_version??>
"osVersion": "${input.os_version}",
</#if>
<#if input.device_model??>
"deviceModel": "${input.device_model}",
</#if>
"category": "MOBILE"
}
"""

SEED_CONTACT_TEMPLATE = """
{
"fields": [
{
"id": 513758,
"value": "${input.user_id!}"
},
{
"id": 513759,
"value": "${input.language!}"
},
{
"id": 513760,
"value": "${input.country!}"
},
{
"id": 513761,
"value": "${input.region!}"
},
{
"id": 513762,
"value": "${input.city!}"
},
{
"id": 513763,
"value": "${input.device_type!}"
},
{
"id": 513764,
"value": "${input.os_version!}"
},
{
"id": 513765,
"value": "${input.version_name!}"
},
{
"id": 513766,
"value": "${input.platform!}"
},
{
"id": 513767,
"value": "${input.library!}"
},
{
"id": 513769,
"value": "${input.device_carrier!}"
},
{
"id": 513770,
"value": "${input.device_id!}"
},
{
"id": 514043,
"value": "${input.user_properties.subscription_product!}"
},
{
"id": 514044,
"value": "${input.user_properties.subscription_state!}"
},
{
"id": 514045,
"value": "${input.user_properties.has_subscription!}"
}
],
"channels": [
{
"device": {
"appId": "vcfc4f0e-z891-355b-aea3-107f2f18e6ds"
},
"type": "email",
"value": "${input.user_properties.email!}"
}
],
"externalCustomerId": "${input.user_id!}"
}
"""

SEED_APP_ID = "vcfc4f0e-z891-355b-aea3-107f2f18e6ds"

# One Amplitude event, as the source document's templates see it.
AMPLITUDE_INPUT: dict[str, Any] = {
    "user_id": "user-42",
    "amplitude_id": 123456789,
    "device_id": "6F9619FF-8B86-D011-B42D-00C04FC964FF",
    "os_name": "ios",
    "os_version": "17.4.1",
    "version_name": "3.2.0",
    "device_model": "iPhone15,2",
    "language": "en-US",
    "country": "United States",
    "region": "California",
    "city": "San Francisco",
    "device_type": "Apple iPhone 14 Pro",
    "platform": "iOS",
    "library": "amplitude-swift/1.4.0",
    "device_carrier": "T-Mobile",
    "user_properties": {
        "email": "jane@example.com",
        "subscription_product": "pro_monthly",
        "subscription_state": "active",
        "has_subscription": True,
    },
    "event_type": "Subscription Started",
    "event_properties": {"parameter_1": "pro_monthly", "parameter_2": "9.99", "parameter_3": "USD"},
}

# The Segment identify carrying the same facts, as the normaliser writes it.
SEGMENT_IDENTIFY: dict[str, Any] = {
    "type": "identify",
    "messageId": "msg-identify-1",
    "userId": "user-42",
    "anonymousId": "anon-7",
    "traits": {
        "email": "jane@example.com",
        "subscription_product": "pro_monthly",
        "subscription_state": "active",
        "has_subscription": True,
    },
    "context": {
        "device": {
            "id": "6F9619FF-8B86-D011-B42D-00C04FC964FF",
            "model": "iPhone15,2",
            "name": "Apple iPhone 14 Pro",
        },
        "os": {"name": "iOS", "version": "17.4.1"},
        "app": {"version": "3.2.0"},
        "locale": "en-US",
        "location": {"country": "United States", "region": "California", "city": "San Francisco"},
        "library": {"name": "amplitude-swift/1.4.0"},
        "network": {"carrier": "T-Mobile"},
    },
    "properties": {},
    "integrations": {},
    "timestamp": "2024-05-01T12:00:00.000Z",
}

# The source document's custom field ids, each bound to where a Segment event keeps the same fact.
SEED_CONTACT_FIELDS = {
    "userId": 513758,
    "context.locale": 513759,
    "context.location.country": 513760,
    "context.location.region": 513761,
    "context.location.city": 513762,
    "context.device.name": 513763,
    "context.os.version": 513764,
    "context.app.version": 513765,
    "context.os.name": 513766,
    "context.library.name": 513767,
    "context.network.carrier": 513769,
    "context.device.id": 513770,
    "subscription_product": 514043,
    "subscription_state": 514044,
    "has_subscription": 514045,
}


def render(template: str, data: dict[str, Any]) -> Any:
    """The FreeMarker subset Reteno's templates use (docs/MAPPINGS.md#reteno): `<#if input.x??>`,
    `${input.x}`, `!`, `?upper_case`."""

    def lookup(path: str) -> Any:
        node: Any = data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def conditional(match: re.Match[str]) -> str:
        return match.group(2) if lookup(match.group(1)) is not None else ""

    def interpolate(match: re.Match[str]) -> str:
        value = lookup(match.group(1))
        if value is None:
            if match.group(2) != "!":
                raise KeyError(match.group(1))
            return ""
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if match.group(2) == "?upper_case":
            text = text.upper()
        return json.dumps(text)[1:-1]

    text = re.sub(r"<#if input\.([\w.]+)\?\?>(.*?)</#if>", conditional, template, flags=re.S)
    text = re.sub(r"\$\{input\.([\w.]+)(!|\?upper_case)?\}", interpolate, text)
    return json.loads(text)


def render_seed_event(data: dict[str, Any], parameters: list[str]) -> dict[str, Any]:
    """The event template in docs/MAPPINGS.md#reteno, which loops with `<#list>`, written out by hand:

    {"eventTypeKey": "${input.event_type!}",
     "params": [ <#if input.amplitude_id??> {"name": "externalCustomerId", "value": "${input.user_id}"}
                 <#list ["parameter_1", ...] as param> <#if input.event_properties[param]??>
                   , {"name": "${param}", "value": "${input.event_properties[param]}"} ... ]}
    """
    params = []
    if data.get("amplitude_id") is not None:
        params.append({"name": "externalCustomerId", "value": str(data["user_id"])})
    for name in parameters:
        if name in data["event_properties"]:
            params.append({"name": name, "value": str(data["event_properties"][name])})
    return {"eventTypeKey": data.get("event_type", ""), "params": params}


def seed_destination():
    return make(RetenoConfig(contact_fields=SEED_CONTACT_FIELDS, app_id=SEED_APP_ID))


def by_endpoint(items: list[Item]) -> dict[str, Item]:
    return {item.endpoint: item for item in items}


# --- golden: the source document's three payloads ----------------------------------------------


def test_identify_registers_the_device_exactly_as_the_seed_payload():
    items = by_endpoint(seed_destination().map_event(SEGMENT_IDENTIFY))

    assert items[DEVICES.name].payload == render(SEED_DEVICE_TEMPLATE, AMPLITUDE_INPUT)


def test_identify_updates_the_contact_exactly_as_the_seed_payload():
    items = by_endpoint(seed_destination().map_event(SEGMENT_IDENTIFY))

    assert items[CONTACTS.name].payload == render(SEED_CONTACT_TEMPLATE, AMPLITUDE_INPUT)


def test_track_is_the_seed_event_payload_plus_the_message_id_as_key_value():
    track = {
        "type": "track",
        "event": "Subscription Started",
        "messageId": "msg-track-1",
        "userId": "user-42",
        "anonymousId": "anon-7",
        "properties": {"parameter_1": "pro_monthly", "parameter_2": "9.99", "parameter_3": "USD"},
        "context": {},
        "timestamp": "2024-05-01T12:00:00.000Z",
    }

    [item] = seed_destination().map_event(track)

    expected = render_seed_event(AMPLITUDE_INPUT, ["parameter_1", "parameter_2", "parameter_3"])
    assert item.payload == {**expected, "keyValue": "msg-track-1"}
    assert (item.endpoint, item.dedupe_id, item.user) == (EVENTS.name, "msg-track-1", "user-42")


# --- identify details ---------------------------------------------------------------------------


def test_identify_yields_device_then_contact_both_about_the_user():
    items = seed_destination().map_event(SEGMENT_IDENTIFY)

    assert [i.endpoint for i in items] == [DEVICES.name, CONTACTS.name]
    assert {i.dedupe_id for i in items} == {"msg-identify-1"}
    assert {i.user for i in items} == {"user-42"}


def test_anonymous_identify_registers_the_anonymous_id_as_a_device_and_no_contact():
    event = {"type": "identify", "messageId": "m1", "anonymousId": "anon-9", "traits": {}, "context": {}}

    [device] = make(RetenoConfig()).map_event(event)

    assert device.endpoint == DEVICES.name
    assert device.payload == {"deviceId": "anon-9", "category": "MOBILE"}
    assert device.user == "anon-9"


def test_identify_without_email_sends_no_contact_because_channels_are_required():
    event = {**SEGMENT_IDENTIFY, "traits": {"plan": "pro"}}

    items = seed_destination().map_event(event)

    assert [i.endpoint for i in items] == [DEVICES.name]


def test_contact_leaves_out_missing_fields_instead_of_blanking_them():
    event = {"type": "identify", "messageId": "m1", "userId": "u1", "anonymousId": "a1"}
    event["traits"] = {"email": "u1@example.com", "plan": "pro"}

    items = by_endpoint(make(RetenoConfig(contact_fields={"plan": 7, "age": 8})).map_event(event))

    assert items[CONTACTS.name].payload == {
        "channels": [{"type": "email", "value": "u1@example.com"}],
        "fields": [{"id": 7, "value": "pro"}],
        "externalCustomerId": "u1",
    }


@pytest.mark.parametrize(
    ("os_name", "os_type"),
    [("iOS", "IOS"), ("Android", "ANDROID"), ("iPadOS", "IOS"), ("Windows", None), ("Mac OS X", None)],
)
def test_os_type_is_upper_case_and_only_what_the_api_accepts(os_name, os_type):
    event = {"type": "identify", "messageId": "m", "anonymousId": "a", "context": {"os": {"name": os_name}}}

    [device] = make(RetenoConfig()).map_event(event)

    assert device.payload.get("osType") == os_type


def test_device_category_comes_from_config():
    event = {"type": "identify", "messageId": "m", "anonymousId": "a"}

    [device] = make(RetenoConfig(category="TABLET")).map_event(event)

    assert device.payload["category"] == "TABLET"


# A realistic Segment iOS identify (analytics-swift: device.type "ios", os.name "iOS", app.version is
# CFBundleShortVersionString) and the seed device payload it stands for: Amplitude's device_id,
# user_id, os_name, version_name, os_version, device_model.
IOS_APP_IDENTIFY: dict[str, Any] = {
    "type": "identify",
    "messageId": "m-ios",
    "userId": "user-42",
    "anonymousId": "anon-7",
    "traits": {},
    "context": {
        "device": {"id": "6F9619FF-8B86-D011-B42D-00C04FC964FF", "type": "ios", "model": "iPhone15,2"},
        "os": {"name": "iOS", "version": "17.4.1"},
        "app": {"version": "3.2.0", "build": "412"},
        "library": {"name": "analytics-swift", "version": "1.5.0"},
        # analytics-swift reports the WebKit agent of the device: a Mozilla string, yet an app event.
        "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15",
    },
}


def test_ios_app_device_is_the_seed_payload():
    [device] = make(RetenoConfig()).map_event(IOS_APP_IDENTIFY)

    assert device.payload == render(SEED_DEVICE_TEMPLATE, AMPLITUDE_INPUT | {"user_id": "user-42"})


def test_android_app_device_takes_its_os_from_the_device_type_when_the_os_name_is_missing():
    event = {
        "type": "identify",
        "messageId": "m-android",
        "anonymousId": "anon-8",
        "context": {"device": {"id": "android-id-1", "type": "android", "model": "Pixel 7"}, "app": {"version": "2.0"}},
    }

    [device] = make(RetenoConfig()).map_event(event)

    assert device.payload == {
        "deviceId": "android-id-1",
        "osType": "ANDROID",
        "appVersion": "2.0",
        "deviceModel": "Pixel 7",
        "category": "MOBILE",
    }


@pytest.mark.parametrize(
    "context",
    [
        # What the normaliser makes of a phone browser's identify (analytics.js, UA enrichment). The
        # seed's os_name is Amplitude's, the browser ("Mobile Safari"), never IOS; the old mapping
        # sent context.os.name's IOS and registered the browser as an iOS app device.
        {
            "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile Safari",
            "device": {"type": "mobile", "manufacturer": "Apple", "model": "iPhone"},
            "os": {"name": "iOS", "version": "17.0"},
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
        },
        {"os": {"name": "Android", "version": "14"}, "library": {"name": "analytics.js"}},
        {"os": {"name": "Android"}, "userAgent": "Mozilla/5.0 (Linux; Android 14) Chrome/120.0 Mobile Safari/537.36"},
    ],
)
def test_a_browser_is_registered_without_an_app_os_type(context):
    event = {"type": "identify", "messageId": "m-web", "anonymousId": "anon-web", "context": context, "channel": "web"}

    [device] = make(RetenoConfig()).map_event(event)

    assert "osType" not in device.payload
    assert device.payload["deviceId"] == "anon-web"


def test_an_app_agent_that_is_not_a_browser_keeps_the_os_name():
    # analytics-android's Dalvik agent: the UA enricher's device.type "mobile", os Android.
    context = {
        "userAgent": "Dalvik/2.1.0 (Linux; U; Android 9)",
        "device": {"type": "mobile"},
        "os": {"name": "Android"},
    }
    event = {"type": "identify", "messageId": "m", "anonymousId": "a", "context": context}

    [device] = make(RetenoConfig()).map_event(event)

    assert device.payload["osType"] == "ANDROID"


@pytest.mark.parametrize("os_name", [" iOS", "iOS ", "ios"])
def test_os_type_ignores_case_and_surrounding_spaces(os_name):
    event = {"type": "identify", "messageId": "m", "anonymousId": "a", "context": {"os": {"name": os_name}}}

    [device] = make(RetenoConfig()).map_event(event)

    assert device.payload["osType"] == "IOS"


def test_device_category_outside_the_api_enum_is_refused_at_start():
    # Reteno's DeviceCategoryRemote is MOBILE | TABLET: "mobile" would have every device refused.
    env: dict[str, str] = {"RETENO_CATEGORY": "mobile"}
    with pytest.raises(ConfigError, match="RETENO_CATEGORY"):
        RetenoConfig.from_sources(env)


# --- events -------------------------------------------------------------------------------------


def _event(**fields: Any) -> dict[str, Any]:
    return {"messageId": "m-1", "anonymousId": "anon", "properties": {}, "context": {}, **fields}


@pytest.mark.parametrize(
    ("event", "key"),
    [
        (_event(type="page", name="Pricing"), "Viewed Pricing Page"),
        (_event(type="page"), "Loaded a Page"),
        (_event(type="screen", name="Settings"), "Viewed Settings Screen"),
        (_event(type="screen"), "Loaded a Screen"),
        (_event(type="track", event="Signed Up! (web/app)"), "Signed Up (web app)"),
        (_event(type="track", event="x" * 150), "x" * 100),
    ],
)
def test_event_type_key_follows_segment_naming_within_the_api_rules(event, key):
    assert event_type_key(event) == key


def test_track_without_a_usable_name_is_invalid():
    with pytest.raises(Unmappable, match="eventTypeKey"):
        make(RetenoConfig()).map_event(_event(type="track", event="?!", userId="u"))


def test_anonymous_track_is_skipped_because_reteno_cannot_find_the_contact():
    with pytest.raises(Skip, match="userId or an email"):
        make(RetenoConfig()).map_event(_event(type="track", event="Clicked"))


def test_track_without_user_id_identifies_the_contact_by_email():
    event = _event(type="track", event="Clicked", context={"traits": {"email": "a@example.com"}})

    [item] = make(RetenoConfig()).map_event(event)

    assert item.payload["params"] == [{"name": "email", "value": "a@example.com"}]
    assert item.user == "anon"


def test_every_property_becomes_a_text_param_and_nulls_are_dropped():
    properties = {"revenue": 9.5, "count": 3, "gift": False, "tags": ["a", "b"], "note": None}
    event = _event(type="track", event="Order Completed", userId="u", properties=properties)

    [item] = make(RetenoConfig()).map_event(event)

    assert item.payload["params"] == [
        {"name": "externalCustomerId", "value": "u"},
        {"name": "revenue", "value": "9.5"},
        {"name": "count", "value": "3"},
        {"name": "gift", "value": "false"},
        {"name": "tags", "value": '["a","b"]'},
    ]


def test_a_message_id_the_api_would_refuse_becomes_a_stable_digest():
    event = _event(type="track", event="Clicked", userId="u", messageId="bad/id?")

    first = make(RetenoConfig()).map_event(event)[0].payload["keyValue"]
    again = make(RetenoConfig()).map_event(event)[0].payload["keyValue"]

    assert first == again
    assert first.startswith("mid-") and "/" not in first and "?" not in first


@pytest.mark.parametrize("kind", ["group", "alias"])
def test_calls_reteno_has_no_equivalent_for_are_skipped(kind):
    with pytest.raises(Skip):
        make(RetenoConfig()).map_event(_event(type=kind, userId="u"))


@pytest.mark.parametrize(
    ("value", "text"), [(True, "true"), (0, "0"), (1.25, "1.25"), ("x", "x"), ({"a": 1}, '{"a":1}')]
)
def test_as_text(value, text):
    assert as_text(value) == text


# --- encode -------------------------------------------------------------------------------------


def test_encode_sends_one_item_with_the_access_key_to_the_endpoint_base():
    destination = make(RetenoConfig(access_key="secret-key", contact_fields=SEED_CONTACT_FIELDS))
    device, contact = destination.map_event(SEGMENT_IDENTIFY)

    request = destination.encode(DEVICES, [device])

    assert (request.method, request.base, request.path) == ("POST", "mobile", "/api/v1/device")
    assert request.headers["X-Reteno-Access-Key"] == "secret-key"
    assert orjson.loads(request.body) == device.payload
    assert destination.encode(CONTACTS, [contact]).base == "default"
    assert destination.base_urls == {"default": "https://api.reteno.com", "mobile": "https://mobile-api.reteno.com"}


def test_encode_refuses_more_than_one_item():
    destination = make(RetenoConfig())
    item = Item(EVENTS.name, {"eventTypeKey": "x"}, "m")

    with pytest.raises(ValueError, match="one item"):
        destination.encode(EVENTS, [item, item])


# --- classify -----------------------------------------------------------------------------------

EVENT_ITEM = Item(EVENTS.name, {"eventTypeKey": "Clicked", "keyValue": "m"}, "m", "u")


def classify(status: int, body: bytes = b"", headers: dict[str, str] | None = None, endpoint=EVENTS):
    return make(RetenoConfig()).classify(endpoint, [EVENT_ITEM], status, body, headers or {})


def test_classify_2xx_is_ok():
    outcome = classify(200)

    assert outcome.http_status == 200
    assert outcome.for_item(0).verdict is Verdict.OK


def test_classify_429_retries_after_the_retry_after_header():
    result = classify(429, b'{"message": "too many requests"}', {"retry-after": "7"}).for_item(0)

    assert (result.verdict, result.retry_after) == (Verdict.RETRY, 7.0)


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_classify_transient_statuses_retry(status):
    assert classify(status).for_item(0).verdict is Verdict.RETRY


def test_classify_413_splits():
    assert classify(413).for_item(0).verdict is Verdict.SPLIT


def test_classify_required_params_400_names_the_missing_params():
    body = b'The event should have the following params: [{"name": "EmailAddress", "required": true},'
    body += b' {"name": "Phone Number", "required": false}]'

    result = classify(400, body).for_item(0)

    assert result.verdict is Verdict.PERMANENT
    assert result.reason == "HTTP 400: event type requires params ['EmailAddress']"


def test_classify_other_400_is_permanent_with_the_body_as_reason():
    result = classify(400, b'{"message": "channels is required"}', endpoint=CONTACTS).for_item(0)

    assert result.verdict is Verdict.PERMANENT
    assert "channels is required" in result.reason


def test_classify_401_is_retried_and_points_at_the_key():
    result = classify(401, b'{"message": "Unauthorized"}').for_item(0)

    assert result.verdict is Verdict.RETRY
    assert "RETENO_ACCESS_KEY" in result.reason


# --- config -------------------------------------------------------------------------------------


def test_config_reads_reteno_variables():
    env: dict[str, str] = {}
    env["RETENO_ACCESS_KEY"] = "k-1"
    env["RETENO_BASE_URL"] = "http://127.0.0.1:9000"
    env["RETENO_CONTACT_FIELDS"] = '{"plan": 12, "context.location.city": 13}'

    config = RetenoConfig.from_sources(env)

    assert config.access_key is not None and config.access_key.get_secret_value() == "k-1"
    assert config.base_url == "http://127.0.0.1:9000"
    assert config.mobile_base_url == "https://mobile-api.reteno.com"
    assert config.contact_fields == {"plan": 12, "context.location.city": 13}
    assert config.category == "MOBILE"
