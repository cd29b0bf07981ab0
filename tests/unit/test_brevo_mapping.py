"""Golden tests for the Brevo mapping: events, contact upserts, skips, and response classification.

Expected payloads follow Brevo's API reference (POST /v3/events, POST /v3/contacts) and the
event/property mapping tables in docs/MAPPINGS.md#brevo.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.destinations.base import Item, Skip, Unmappable, Verdict
from worker.destinations.brevo import (
    CONTACTS,
    DEFAULT_ATTRIBUTE_MAP,
    EVENTS,
    BrevoConfig,
    make,
    slug,
)


def track(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "track",
        "event": "Video Played",
        "messageId": "msg-1",
        "anonymousId": "anon-1",
        "userId": "user-1",
        "properties": {},
        "context": {},
        "timestamp": "2024-02-06T20:59:23.383Z",
    }
    return {**event, **fields}


# --- track -> POST /v3/events -------------------------------------------------------------------


def test_track_maps_to_a_brevo_event_with_identifiers_properties_and_date():
    event = track(
        properties={"video_title": "Brevo CRM", "duration": 142, "autoplayed": False},
        context={"traits": {"email": "jane.doe@example.com", "firstName": "Jane", "age": 32}},
    )

    [item] = make(BrevoConfig()).map_event(event)

    assert item.endpoint == EVENTS.name
    assert item.payload == {
        "event_name": "video_played",
        "event_date": "2024-02-06T20:59:23.383Z",
        "identifiers": {"email_id": "jane.doe@example.com", "ext_id": "user-1"},
        "contact_properties": {"FIRSTNAME": "Jane"},
        "event_properties": {
            "video_title": "Brevo CRM",
            "duration": 142,
            "autoplayed": False,
            "messageId": "msg-1",
        },
    }
    assert (item.dedupe_id, item.user) == ("msg-1", "user-1")


@pytest.mark.parametrize(
    ("segment_name", "brevo_name"),
    [
        ("Purchase", "order_completed"),
        ("Sign Up", "customer_created"),
        ("Add to Cart", "cart_updated"),
        ("Subscription Started", "subscription_created"),
        ("Order Completed", "order_completed"),
        ("Product Viewed (v2)!", "product_viewed_v2"),
    ],
)
def test_event_names_follow_the_seed_table_else_become_valid_brevo_names(segment_name, brevo_name):
    [item] = make(BrevoConfig()).map_event(track(event=segment_name))

    assert item.payload["event_name"] == brevo_name


def test_event_map_can_be_configured():
    config = BrevoConfig(event_map={"Checkout Started": "checkout-begin"})

    [item] = make(config).map_event(track(event="Checkout Started"))

    assert item.payload["event_name"] == "checkout-begin"


def test_page_and_screen_become_viewed_events_carrying_their_name():
    page = track(type="page", name="Pricing", properties={"url": "https://x.test/pricing"})
    screen = track(type="screen", name="Settings")
    del page["event"], screen["event"]

    [page_item] = make(BrevoConfig()).map_event(page)
    [screen_item] = make(BrevoConfig()).map_event(screen)

    assert page_item.payload["event_name"] == "page_viewed"
    assert page_item.payload["event_properties"] == {
        "url": "https://x.test/pricing",
        "name": "Pricing",
        "messageId": "msg-1",
    }
    assert screen_item.payload["event_name"] == "screen_viewed"


def test_event_property_keys_are_made_valid_and_nulls_dropped_at_every_level():
    properties = {"Order ID": "o-1", "coupon": None, "cart": {"item count": 2, "gift?": None}}

    [item] = make(BrevoConfig()).map_event(track(properties=properties))

    assert item.payload["event_properties"] == {
        "Order_ID": "o-1",
        "cart": {"item_count": 2},
        "messageId": "msg-1",
    }


def test_track_with_only_an_email_is_identified_by_email():
    event = track(context={"traits": {"email": "a@example.com"}})
    del event["userId"]

    [item] = make(BrevoConfig()).map_event(event)

    assert item.payload["identifiers"] == {"email_id": "a@example.com"}
    assert item.user == "anon-1"


def test_track_without_email_or_user_id_is_skipped_with_a_reason():
    event = track()
    del event["userId"]

    with pytest.raises(Skip, match=r"userId \(ext_id\), an email \(email_id\) or a phone \(phone_id\)"):
        make(BrevoConfig()).map_event(event)


def test_track_from_a_phone_only_contact_is_identified_by_phone_id():
    # An identify with only a phone creates an SMS contact (test_anonymous_identify_with_a_phone_...);
    # its events used to be skipped although Brevo's create-event `identifiers` take `phone_id`
    # ("SMS associated with the event", https://developers.brevo.com/reference/create-event).
    event = track(context={"traits": {"phone": "+14155550100", "firstName": "Jo"}})
    del event["userId"]

    [item] = make(BrevoConfig()).map_event(event)

    assert item.payload["identifiers"] == {"phone_id": "+14155550100"}
    assert item.payload["contact_properties"] == {"SMS": "+14155550100", "FIRSTNAME": "Jo"}


@pytest.mark.parametrize(("phone", "phone_id"), [(14155550100, "14155550100"), ("  ", None), (True, None), (1.5, None)])
def test_phone_id_is_text_and_only_from_a_usable_phone(phone, phone_id):
    event = track(context={"traits": {"phone": phone}})

    [item] = make(BrevoConfig()).map_event(event)

    assert item.payload["identifiers"].get("phone_id") == phone_id
    assert item.payload["identifiers"]["ext_id"] == "user-1"


def test_track_whose_name_has_nothing_brevo_accepts_is_invalid():
    with pytest.raises(Unmappable, match="event_name"):
        make(BrevoConfig()).map_event(track(event="!!!"))


def test_slug_keeps_names_within_255_characters():
    assert slug("A" * 300) == "a" * 255


# --- identify -> POST /v3/contacts --------------------------------------------------------------


def identify(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "identify",
        "messageId": "msg-2",
        "anonymousId": "anon-1",
        "userId": "user-1",
        "traits": {},
        "context": {},
    }
    return {**event, **fields}


def test_identify_upserts_the_contact_with_mapped_attributes_and_configured_lists():
    traits = {
        "email": "jane@example.com",
        "firstName": "Jane",
        "lastName": "Doe",
        "phone": "+33612345678",
        "plan_type": "premium",
        "total_purchases": 4,
        "lifetime_revenue": 129.5,
        "favourite_colour": "green",  # not mapped: stays out
        "address": {"city": "Paris"},  # not a scalar: stays out even if mapped
    }
    config = BrevoConfig(list_ids=[10, 11], attribute_map={**DEFAULT_ATTRIBUTE_MAP, "address": "ADDRESS"})

    [item] = make(config).map_event(identify(traits=traits))

    assert item.endpoint == CONTACTS.name
    assert item.payload == {
        "updateEnabled": True,
        "email": "jane@example.com",
        "ext_id": "user-1",
        "attributes": {
            "FIRSTNAME": "Jane",
            "LASTNAME": "Doe",
            "SMS": "+33612345678",
            "PLAN": "premium",
            "ORDER_COUNT": 4,
            "LTV": 129.5,
        },
        "listIds": [10, 11],
    }
    assert (item.dedupe_id, item.user) == ("msg-2", "user-1")


def test_identify_without_lists_or_attributes_sends_only_identifiers():
    [item] = make(BrevoConfig()).map_event(identify(traits={"email": "a@example.com"}))

    assert item.payload == {"updateEnabled": True, "email": "a@example.com", "ext_id": "user-1"}


def test_anonymous_identify_with_a_phone_creates_an_sms_contact():
    event = identify(traits={"phone": "+14155550100"})
    del event["userId"]

    [item] = make(BrevoConfig()).map_event(event)

    assert item.payload == {"updateEnabled": True, "attributes": {"SMS": "+14155550100"}}


def test_anonymous_identify_without_email_or_phone_is_skipped():
    event = identify(traits={"firstName": "Jane"})
    del event["userId"]

    with pytest.raises(Skip, match="email, a userId"):
        make(BrevoConfig()).map_event(event)


@pytest.mark.parametrize("kind", ["group", "alias"])
def test_calls_brevo_has_no_equivalent_for_are_skipped(kind):
    with pytest.raises(Skip, match=kind):
        make(BrevoConfig()).map_event(identify(type=kind))


# --- encode -------------------------------------------------------------------------------------


def test_encode_posts_the_item_with_the_api_key_header():
    destination = make(BrevoConfig(api_key="xkeysib-123"))
    [item] = destination.map_event(track())

    request = destination.encode(EVENTS, [item])

    assert (request.method, request.base, request.path) == ("POST", "default", "/v3/events")
    assert request.headers["api-key"] == "xkeysib-123"
    assert orjson.loads(request.body) == item.payload
    assert destination.base_urls == {"default": "https://api.brevo.com"}


# --- classify -----------------------------------------------------------------------------------

CONTACT = Item(CONTACTS.name, {"updateEnabled": True, "email": "a@example.com"}, "m", "u")
EVENT = Item(EVENTS.name, {"event_name": "x", "identifiers": {"ext_id": "u"}}, "m", "u")


def classify(endpoint, item: Item, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
    return make(BrevoConfig()).classify(endpoint, [item], status, body, headers or {}).for_item(0)


@pytest.mark.parametrize(("endpoint", "item", "status"), [(EVENTS, EVENT, 204), (CONTACTS, CONTACT, 201)])
def test_success_statuses_are_ok(endpoint, item, status):
    assert classify(endpoint, item, status).verdict is Verdict.OK


def test_429_waits_for_the_rate_limit_reset_header_brevo_sends_instead_of_retry_after():
    body = b'{"code": "too_many_requests", "message": "Too many requests"}'
    headers = {"x-sib-ratelimit-limit": "10", "x-sib-ratelimit-remaining": "0", "X-Sib-Ratelimit-Reset": "3"}

    result = classify(EVENTS, EVENT, 429, body, headers)

    assert (result.verdict, result.retry_after) == (Verdict.RETRY, 3.0)


def test_429_with_retry_after_uses_it():
    result = classify(EVENTS, EVENT, 429, b"", {"Retry-After": "5", "x-sib-ratelimit-reset": "30"})

    assert result.retry_after == 5.0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_retry(status):
    assert classify(EVENTS, EVENT, status, b'{"code": "internal_error", "message": "x"}').verdict is Verdict.RETRY


def test_invalid_parameter_is_permanent_with_brevo_code_and_message():
    body = b'{"code": "invalid_parameter", "message": "event_name must be alphanumeric"}'

    result = classify(EVENTS, EVENT, 400, body)

    assert result.verdict is Verdict.PERMANENT
    assert result.reason == "HTTP 400 invalid_parameter: event_name must be alphanumeric"


def test_unauthorized_is_retried_so_a_wrong_key_pauses_the_sink_instead_of_dead_lettering_everything():
    result = classify(CONTACTS, CONTACT, 401, b'{"code": "unauthorized", "message": "Key not found"}')

    assert result.verdict is Verdict.RETRY
    assert "Key not found" in result.reason and "check the API key" in result.reason


def test_duplicate_contact_without_update_enabled_means_it_already_exists_which_is_fine():
    create_only = Item(CONTACTS.name, {"email": "a@example.com"}, "m", "u")
    body = b'{"code": "duplicate_parameter", "message": "Contact already exist"}'

    assert classify(CONTACTS, create_only, 400, body).verdict is Verdict.OK


def test_duplicate_parameter_on_an_upsert_is_an_identifier_conflict_and_permanent():
    body = b'{"code": "duplicate_parameter", "message": "SMS is already associated with another Contact"}'

    result = classify(CONTACTS, CONTACT, 400, body)

    assert result.verdict is Verdict.PERMANENT
    assert "already associated with another Contact" in result.reason


def test_a_4xx_without_brevo_error_body_keeps_the_common_reason():
    result = classify(EVENTS, EVENT, 404, b"<html>not found</html>")

    assert (result.verdict, result.reason) == (Verdict.PERMANENT, "HTTP 404: <html>not found</html>")


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_follow_seed_003():
    config = BrevoConfig()

    assert config.base_url == "https://api.brevo.com"
    assert config.attribute_map["firstName"] == "FIRSTNAME"
    assert config.attribute_map["lastName"] == "LASTNAME"
    assert config.attribute_map["phone"] == "SMS"
    assert config.list_ids == []


@pytest.mark.parametrize("raw", ["10,11", "[10, 11]", " 10 , 11 "])
def test_config_reads_list_ids_as_csv_or_json(raw):
    env: dict[str, str] = {}
    env["BREVO_LIST_IDS"] = raw

    assert BrevoConfig.from_sources(env).list_ids == [10, 11]


def test_config_reads_api_key_and_attribute_map_from_env():
    env: dict[str, str] = {}
    env["BREVO_API_KEY"] = "xkeysib-abc"
    env["BREVO_ATTRIBUTE_MAP"] = '{"plan": "PLAN"}'

    config = BrevoConfig.from_sources(env)

    assert config.api_key is not None and config.api_key.get_secret_value() == "xkeysib-abc"
    assert config.attribute_map == {"plan": "PLAN"}
