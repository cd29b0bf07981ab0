"""The normaliser's logic without Kafka: real enrichers (bundled geo database, ua-parser), real codec."""

import orjson
import pytest

from worker.avro_codec import EventCodec
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser
from worker.normalize.user_agent import UserAgentEnricher
from worker.segment.ids import anonymous_id_for_user

ALL = ["amplitude", "amberflo", "reteno", "brevo"]
KAFKA_TS = 1_795_000_000_000  # receivedAt when the event has none
AT = ("t.segment.raw", 0, 0)  # the record's topic, partition and offset
IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Mobile/15E148 Safari/604.1"
)


@pytest.fixture(scope="module")
def enrichers():
    return [GeoEnricher(), UserAgentEnricher()]


@pytest.fixture
def normaliser(enrichers):
    return Normaliser(ALL, IdentityMap(1000), enrichers)


def one(normaliser, event, destinations=None):
    result = normaliser.process(orjson.dumps(event), KAFKA_TS, *AT)
    assert not result.rejected, result.rejected
    assert len(result.routed) == 1
    routed = result.routed[0]
    decoded, _extra = EventCodec().decode(routed.value)
    assert decoded == routed.event
    return routed


@pytest.mark.parametrize(
    "event",
    [
        {"type": "track", "userId": "u1", "event": "Signed Up"},
        {"type": "identify", "userId": "u1", "traits": {"email": "a@b.c"}},
        {"type": "page", "anonymousId": "a1", "name": "Home"},
        {"type": "screen", "userId": "u1", "name": "Settings"},
        {"type": "group", "userId": "u1", "groupId": "g1"},
        {"type": "alias", "userId": "u1", "previousId": "a1"},
    ],
)
def test_every_event_type_comes_out_complete(normaliser, event):
    out = one(normaliser, event).event
    assert out["type"] == event["type"]
    assert out["messageId"] and out["anonymousId"]
    assert out["receivedAt"] == out["timestamp"] == out["originalTimestamp"] == "2026-11-18T11:06:40.000Z"
    for name in ("properties", "traits", "context", "integrations"):
        assert isinstance(out[name], dict)


def test_clock_skew_is_corrected_against_received_at(normaliser):
    out = one(
        normaliser,
        {
            "type": "track",
            "userId": "u1",
            "event": "E",
            "timestamp": "2026-11-22T11:00:00Z",  # device clock one hour fast
            "sentAt": "2026-11-22T11:00:10Z",
            "receivedAt": "2026-11-22T10:00:12Z",
        },
    ).event
    assert out["timestamp"] == "2026-11-22T10:00:02.000Z"
    assert out["originalTimestamp"] == "2026-11-22T11:00:00.000Z"
    assert out["sentAt"] == "2026-11-22T11:00:10.000Z"


def test_missing_message_id_is_deterministic(normaliser):
    event = {"type": "track", "userId": "u1", "event": "E", "timestamp": "2026-11-22T10:00:00Z"}
    first = one(normaliser, {**event, "sentAt": "2026-11-22T10:00:01Z"}).event["messageId"]
    again = one(normaliser, {**event, "sentAt": "2026-11-22T10:00:09Z"}).event["messageId"]  # an SDK retry
    other = one(normaliser, {**event, "event": "F"}).event["messageId"]
    assert first == again != other and first.startswith("sw-")


def test_anonymous_id_is_filled_from_the_device_else_from_the_user(normaliser):
    with_device = {"type": "track", "userId": "u1", "event": "E", "context": {"device": {"id": "dev-9"}}}
    assert one(normaliser, with_device).event["anonymousId"] == "dev-9"
    only_user = {"type": "track", "userId": "u1", "event": "E"}
    assert one(normaliser, only_user).event["anonymousId"] == anonymous_id_for_user("u1")
    assert anonymous_id_for_user("u1") == anonymous_id_for_user("u1") != anonymous_id_for_user("u2")


def test_identify_and_alias_link_ids_and_later_anonymous_events_get_the_user(normaliser):
    result = normaliser.process(orjson.dumps({"type": "identify", "userId": "u1", "anonymousId": "a1"}), KAFKA_TS, *AT)
    assert result.links == [("a1", "u1")]
    again = normaliser.process(orjson.dumps({"type": "identify", "userId": "u1", "anonymousId": "a1"}), KAFKA_TS, *AT)
    assert again.links == []  # already known: nothing to publish
    assert one(normaliser, {"type": "page", "anonymousId": "a1"}).event["userId"] == "u1"
    alias = normaliser.process(orjson.dumps({"type": "alias", "userId": "u2", "previousId": "a2"}), KAFKA_TS, *AT)
    assert alias.links == [("a2", "u2")]
    routed = one(normaliser, {"type": "track", "anonymousId": "a2", "event": "E"})
    assert routed.event["userId"] == "u2" and routed.key == "u2"
    assert "userId" not in one(normaliser, {"type": "page", "anonymousId": "stranger"}).event


def test_a_routed_event_carries_its_link_and_extra_fields_for_stitching(normaliser):
    identify = {"type": "identify", "userId": "u1", "anonymousId": "a1"}
    assert one(normaliser, identify).link == ("a1", "u1")
    assert one(normaliser, identify).link == ("a1", "u1")  # known already, still this event's link
    assert one(normaliser, {"type": "alias", "userId": "u2", "previousId": "a2"}).link == ("a2", "u2")
    anonymous = one(normaliser, {"type": "page", "anonymousId": "a3", "custom": 1})
    assert anonymous.link is None and anonymous.extra == {"custom": 1}


def test_enrichment_fills_location_device_os_browser(normaliser):
    context = one(
        normaliser, {"type": "page", "userId": "u", "context": {"ip": "81.2.69.142", "userAgent": IPHONE_UA}}
    ).event["context"]
    assert context["location"]["country"] == "United Kingdom" and context["location"]["city"] == "London"
    assert context["device"] == {"type": "mobile", "manufacturer": "Apple", "model": "iPhone"}
    assert context["os"] == {"name": "iOS", "version": "17.1"}
    assert context["browser"]["name"] == "Mobile Safari"
    assert "bot" not in context


def test_enrichment_leaves_present_fields_alone(normaliser):
    own = {
        "ip": "81.2.69.142",
        "userAgent": IPHONE_UA,
        "location": {"city": "Paris", "country": "France"},
        "device": {"id": "d1", "model": "iPhone15,2", "type": "ios"},
        "os": {"name": "iOS", "version": "17.2.1"},
    }
    context = one(normaliser, {"type": "page", "userId": "u", "context": dict(own)}).event["context"]
    for name in ("location", "device", "os"):
        assert context[name] == own[name]
    assert context["browser"]["name"] == "Mobile Safari"  # absent, so filled


def test_private_ips_get_no_location_and_bots_are_flagged(normaliser):
    headless = (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36"
    )
    context = one(
        normaliser, {"type": "page", "userId": "u", "context": {"ip": "10.1.2.3", "userAgent": headless}}
    ).event["context"]
    assert "location" not in context and context["bot"] is True
    sdk = one(normaliser, {"type": "page", "userId": "u", "context": {"userAgent": "analytics-ios/4.1.8"}}).event[
        "context"
    ]
    assert "bot" not in sdk


def test_routing_by_integrations_and_filtering(normaliser):
    routed = one(
        normaliser, {"type": "track", "userId": "u", "event": "E", "integrations": {"All": False, "Brevo": True}}
    )
    assert routed.destinations == ["brevo"]
    result = normaliser.process(
        orjson.dumps({"type": "track", "userId": "u", "event": "E", "integrations": {"All": False}}), 0, *AT
    )
    assert result.routed == [] and result.filtered == ["no destination enabled by integrations"]


def test_batch_with_one_bad_event_rejects_only_it(normaliser):
    batch = {
        "batch": [
            {"type": "track", "userId": "u", "event": "A"},
            {"type": "track", "userId": "u"},
            {"type": "track", "userId": "u", "event": "C", "timestamp": "not a time"},
        ],
        "context": {"ip": "1.1.1.1"},
    }
    result = normaliser.process(orjson.dumps(batch), KAFKA_TS, *AT)
    assert [r.event["event"] for r in result.routed] == ["A"]
    assert [(r.index, r.reason.split(":")[0]) for r in result.rejected] == [
        (1, "track requires a non-empty `event` name"),
        (2, "not an ISO-8601 timestamp"),
    ]
    # A rejected batch item is dead-lettered as the event itself, batch context merged, ready to replay.
    assert orjson.loads(result.rejected[0].value) == {"type": "track", "userId": "u", "context": {"ip": "1.1.1.1"}}


def test_a_single_bad_event_is_rejected_with_its_original_bytes(normaliser):
    raw = b'{"type":"track","userId":"u","event":""}'
    result = normaliser.process(raw, KAFKA_TS, *AT)
    assert result.rejected[0].value == raw and result.rejected[0].index is None
