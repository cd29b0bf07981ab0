"""Golden tests: every example in Amberflo's Segment destination document (docs/MAPPINGS.md#amberflo),
field for field.

Each test builds the Segment call the source document shows, maps it, and compares with the source
document's curl body copied verbatim. Where the source document's own input and output disagree
(screen's customerId, identify's customer), the input is built to match the output, and a comment
says so.
"""

from __future__ import annotations

import orjson
import pytest

from worker.destinations.amberflo import AmberfloConfig, make
from worker.destinations.base import Item, Skip, Unmappable, Verdict
from worker.segment.event import SegmentEvent

SEED_TIMESTAMP = "2021-04-26T14:01:46.909Z"  # = the source document's meterTimeInMillis 1619445706909


def segment(**fields: object) -> SegmentEvent:
    base: dict[str, object] = {
        "messageId": "messageId",  # the source document writes the placeholder "messageId" as uniqueId
        "anonymousId": "anon-1",
        "timestamp": SEED_TIMESTAMP,
        "properties": {},
        "traits": {},
        "context": {},
        "integrations": {},
    }
    base.update(fields)
    return base  # type: ignore[return-value]


def only_item(event: SegmentEvent) -> Item:
    items = make(AmberfloConfig(api_key="k")).map_event(event)
    assert len(items) == 1
    return items[0]


def test_page_matches_seed_example() -> None:
    event = segment(
        type="page",
        userId="some_user_id",
        name="Home",
        properties={
            "title": "Welcome | Initech",
            "keywords": "paper,comedy",
            "search": "schrute farms",
            "referrer": "https://google.com",
            "path": "/home",
            "browser": "Chrome",
            "url": "https://segment.com",
        },
    )
    seed_body = {
        "uniqueId": "messageId",
        "customerId": "some_user_id",
        "meterApiName": "page",
        "meterValue": 1.0,
        "meterTimeInMillis": 1619445706909,
        "dimensions": {
            "name": "Home",
            "title": "Welcome _ Initech",
            "keywords": "paper,comedy",
            "search": "schrute farms",
            "referrer": "https:__google.com",
            "path": "_home",
            "browser": "Chrome",
            "url": "https:__segment.com",
        },
    }
    item = only_item(event)
    assert item.endpoint == "ingest"
    assert item.payload == seed_body
    assert list(item.payload["dimensions"]) == list(seed_body["dimensions"])  # name first, as shown


def test_screen_matches_seed_example() -> None:
    # The source document's call has userId "some_user_id" but its payload says "segmentUserId"; we reproduce
    # the payload, so the input carries the payload's id.
    event = segment(type="screen", userId="segmentUserId", name="Home", properties={"title": "Welcome | Initech"})
    seed_body = {
        "uniqueId": "messageId",
        "customerId": "segmentUserId",
        "meterApiName": "screen",
        "meterValue": 1.0,
        "meterTimeInMillis": 1619445706909,
        "dimensions": {"name": "Home", "title": "Welcome _ Initech"},
    }
    assert only_item(event).payload == seed_body


def test_track_matches_seed_example() -> None:
    event = segment(
        type="track", userId="some_user_id", event="ApiCalls", properties={"value": 2.0, "region": "us-west-2"}
    )
    seed_body = {
        "uniqueId": "messageId",
        "customerId": "some_user_id",
        "meterApiName": "ApiCalls",
        "meterValue": 2.0,
        "meterTimeInMillis": 1619445706909,
        "dimensions": {"region": "us-west-2"},
    }
    item = only_item(event)
    assert item.payload == seed_body
    assert isinstance(item.payload["meterValue"], float)


def test_identify_matches_seed_example_with_string_traits() -> None:
    # The source document's payload shows customerId "XXXX-ZZZZZ" and customerName "myCustomerName" (its call
    # shows other values), and its email is obfuscated; the input carries the payload's values.
    event = segment(
        type="identify",
        userId="XXXX-ZZZZZ",
        traits={
            "name": "myCustomerName",
            "email": "[email protected]",
            "plan": "premium",
            "logins": 5,
            "phone": "650-769-3240",
            "username": "marakasina",
            "website": "example.com",
            "avatar": "https://s3.amazonaws.com/uifaces/faces/twitter/scottkclark/128.jpg",
        },
    )
    seed_body = {
        "customerId": "XXXX-ZZZZZ",
        "customerName": "myCustomerName",
        "customerEmail": "[email protected]",
        "traits": {
            "plan": "premium",
            "logins": 5,
            "phone": "650-769-3240",
            "username": "marakasina",
            "website": "example.com",
            "avatar": "https:__s3.amazonaws.com_uifaces_faces_twitter_scottkclark_128.jpg",
        },
    }
    # The one deliberate difference: Amberflo's API reference types traits as <string,string>.
    seed_body["traits"]["logins"] = "5"  # type: ignore[index]
    item = only_item(event)
    assert item.endpoint == "customers"
    assert item.payload == seed_body
    assert item.dedupe_id == "messageId"


def test_identify_without_user_id_is_skipped() -> None:
    with pytest.raises(Skip, match="identify without userId"):
        only_item(segment(type="identify", traits={"name": "x"}))


@pytest.mark.parametrize("kind", ["group", "alias"])
def test_types_amberflo_has_no_call_for_are_skipped_with_a_reason(kind: str) -> None:
    with pytest.raises(Skip, match=kind):
        only_item(segment(type=kind, userId="u1", groupId="g1", previousId="p1"))


def test_track_without_value_meters_one_and_falls_back_to_anonymous_id() -> None:
    item = only_item(segment(type="track", event="Login", properties={"ok": True, "n": 3, "tags": ["a/b"]}))
    assert item.payload["meterValue"] == 1.0
    assert item.payload["customerId"] == "anon-1"
    assert item.user == "anon-1"
    assert item.payload["dimensions"] == {"ok": "true", "n": "3", "tags": '["a_b"]'}


def test_track_value_given_as_numeric_string_is_a_number() -> None:
    assert only_item(segment(type="track", event="X", properties={"value": "2.5"})).payload["meterValue"] == 2.5


@pytest.mark.parametrize("value", ["lots", True, {"n": 1}])
def test_track_value_that_is_not_a_number_is_invalid(value: object) -> None:
    with pytest.raises(Unmappable, match=r"properties\.value"):
        only_item(segment(type="track", event="X", properties={"value": value}))


def test_track_without_event_name_is_invalid() -> None:
    with pytest.raises(Unmappable):
        only_item(segment(type="track"))


def test_page_without_name_or_properties_has_no_dimensions() -> None:
    payload = only_item(segment(type="page", userId="u1")).payload
    assert "dimensions" not in payload
    assert payload["meterApiName"] == "page"


def test_identify_without_name_uses_user_id_as_the_required_customer_name() -> None:
    payload = only_item(segment(type="identify", userId="u-42", traits={})).payload
    assert payload == {"customerId": "u-42", "customerName": "u-42", "traits": {}}


def test_encode_ingest_is_an_array_with_api_key_header() -> None:
    destination = make(AmberfloConfig(api_key="secret-key"))
    items = [only_item(segment(type="track", event="A", messageId=f"m{i}")) for i in range(3)]
    request = destination.encode(destination.endpoints["ingest"], items)
    assert (request.method, request.path) == ("POST", "/ingest")
    assert request.headers["X-API-KEY"] == "secret-key"
    assert [record["uniqueId"] for record in orjson.loads(request.body)] == ["m0", "m1", "m2"]


def test_encode_customer_is_the_customer_itself_sent_with_put() -> None:
    destination = make(AmberfloConfig(api_key="k"))
    item = only_item(segment(type="identify", userId="u-42"))
    request = destination.encode(destination.endpoints["customers"], [item])
    assert (request.method, request.path) == ("PUT", "/customers")
    assert orjson.loads(request.body)["customerId"] == "u-42"


def test_endpoint_limits() -> None:
    endpoints = make(AmberfloConfig()).endpoints
    assert endpoints["ingest"].max_items == 100
    assert endpoints["customers"].max_items == 1


def classify(status: int, count: int = 1, endpoint: str = "ingest", headers: dict[str, str] | None = None):
    destination = make(AmberfloConfig(api_key="k"))
    items = [only_item(segment(type="track", event="A", messageId=f"m{i}")) for i in range(count)]
    return destination.classify(destination.endpoints[endpoint], items, status, b'{"message":"x"}', headers or {})


def test_classify_ok_retry_split() -> None:
    assert classify(200, 3).default.verdict is Verdict.OK
    assert classify(503, 3).default.verdict is Verdict.RETRY
    throttled = classify(429, 3, headers={"Retry-After": "7"}).default
    assert (throttled.verdict, throttled.retry_after) == (Verdict.RETRY, 7.0)
    assert classify(413, 3).default.verdict is Verdict.SPLIT


def test_classify_400_splits_a_batch_to_isolate_the_bad_record_and_dead_letters_a_single_one() -> None:
    assert classify(400, 5).default.verdict is Verdict.SPLIT
    single = classify(400, 1).default
    assert single.verdict is Verdict.PERMANENT
    assert "HTTP 400" in single.reason


def test_classify_rejected_key_retries_instead_of_dead_lettering() -> None:
    assert classify(401, 3).default.verdict is Verdict.RETRY
    assert classify(403, 1, endpoint="customers").default.verdict is Verdict.RETRY


def test_config_from_environment() -> None:
    env: dict[str, str] = {}
    env["AMBERFLO_API_KEY"] = "env-key"
    env["AMBERFLO_BASE_URL"] = "http://127.0.0.1:1"
    config = AmberfloConfig.from_sources(env)
    assert config.api_key is not None and config.api_key.get_secret_value() == "env-key"
    assert config.base_url == "http://127.0.0.1:1"
    assert "env-key" not in repr(config)


def test_default_base_url() -> None:
    env: dict[str, str] = {}
    assert AmberfloConfig.from_sources(env).base_url == "https://app.amberflo.io"


def test_event_without_message_id_is_invalid_rather_than_sent_without_a_dedupe_key() -> None:
    event = segment(type="track", event="A")
    del event["messageId"]
    with pytest.raises(Unmappable, match="messageId"):
        only_item(event)
