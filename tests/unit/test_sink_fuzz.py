"""Property tests (hypothesis) of the destination modules: for any event the normaliser can emit,
every destination's `map_event` and then `encode` either give a request body or raise Skip or
Unmappable, never anything else; and `classify` takes any answer without raising, with hints that
are finite and never negative.

The events are SegmentEvent-shaped (worker.segment.event: a known type, string ids, object maps)
with hostile values inside: integers far beyond 64 bits, nan and infinities, wrong types for
context.traits / context.device / properties values, odd unicode, odd timestamps. A second strategy
also breaks the shape itself (properties, traits or context that are not objects), as a record
written by something other than our normaliser would.

`FUZZ_EXAMPLES` (default 300) sets how many examples each property tries. Failures hypothesis found
are kept below as explicit `@example`s, so they are tried on every run whatever the budget.
"""

from __future__ import annotations

import math
import os
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from worker.destinations import amberflo, amplitude, brevo, reteno
from worker.destinations.base import MAX_HINT_SECONDS, Item, Skip, Unmappable, parse_retry_after
from worker.segment.event import EVENT_TYPES

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DESTINATIONS = [
    amplitude.make(amplitude.AmplitudeConfig(api_key="k", property_mapping={"plan": "plan_type"}, min_id_length=1)),
    amberflo.make(amberflo.AmberfloConfig(api_key="k")),
    brevo.make(brevo.BrevoConfig(api_key="k", list_ids=[3, 4])),
    reteno.make(
        reteno.RetenoConfig(
            access_key="k",
            contact_fields={"plan": 1, "context.location.city": 2, "traits.age": 3, "userId": 4},
            app_id="app",
        )
    ),
]

# -- hostile values -----------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 2**100, -(2**200), 10**400])
NUMBERS = st.one_of(
    st.integers(),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300, -1e308, 5e-324, -0.0]),
)
NUMERIC_TEXT = st.sampled_from(
    ["1e999", "-1e999", "nan", "NaN", "inf", "-Infinity", "1e300", "3.5", "12abc", "", " 7 "]
)
TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),  # everything UTF-8 can carry
    st.sampled_from(["\u0000", "\u202e", "e\u0301", "\U0001f600", "a" * 300, "<;'\\/|\"`^?!,>", "\ufeff"]),
    NUMERIC_TEXT,
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)),
    max_leaves=12,
)
KEYS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            "revenue",
            "price",
            "quantity",
            "value",
            "productId",
            "revenueType",
            "name",
            "email",
            "phone",
            "firstName",
            "groupType",
            "total_purchases",
            "plan",
            "age",
            "messageId",
            "externalCustomerId",
        ]
    ),
)
OBJECT = st.dictionaries(KEYS, JSON, max_size=6)
CONTEXT = st.fixed_dictionaries(
    {},
    optional={
        "traits": st.one_of(OBJECT, JSON),
        "device": st.one_of(st.dictionaries(st.sampled_from(["id", "type", "model", "brand"]), JSON), JSON),
        "os": st.one_of(st.dictionaries(st.sampled_from(["name", "version"]), JSON), JSON),
        "app": st.one_of(st.dictionaries(st.sampled_from(["version", "name"]), JSON), JSON),
        "location": st.one_of(st.dictionaries(st.sampled_from(["city", "latitude", "country"]), JSON), JSON),
        "library": st.one_of(st.dictionaries(st.sampled_from(["name", "version"]), JSON), JSON),
        "ip": JSON,
        "locale": JSON,
        "userAgent": JSON,
    },
)
IDS = st.text(min_size=1, max_size=40)
TIMESTAMPS = st.one_of(
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"),
    st.sampled_from(
        [
            "2026-11-22T10:00:00.000Z",
            "0001-01-01T00:00:00.000Z",
            "9999-12-31T23:59:59.999Z",
            "2026-13-45T99:99:99.999Z",
            "not a date",
            "",
        ]
    ),
)


@st.composite
def normalised_events(draw: st.DrawFn, maps: st.SearchStrategy[Any] = OBJECT) -> dict[str, Any]:
    """An event as the normaliser writes it (worker.segment.event), with hostile values inside."""
    kind = draw(st.sampled_from(EVENT_TYPES))
    made: dict[str, Any] = {
        "type": kind,
        "messageId": draw(IDS),
        "anonymousId": draw(IDS),
        "timestamp": draw(TIMESTAMPS),
        "properties": draw(maps),
        "traits": draw(maps),
        "context": draw(st.one_of(CONTEXT, maps)),
        "integrations": {},
    }
    if draw(st.booleans()):
        made["userId"] = draw(IDS)
    if kind == "track":
        made["event"] = draw(st.one_of(IDS, st.sampled_from(["Purchase", "Order Completed", "???", "a/b|c"])))
    if kind in ("page", "screen") and draw(st.booleans()):
        made["name"] = draw(TEXT)
    if kind == "page" and draw(st.booleans()):
        made["category"] = draw(TEXT)
    if kind == "group":
        made["groupId"] = draw(IDS)
    if kind == "alias":
        made["previousId"] = draw(IDS)
        made["userId"] = draw(IDS)
    return made


# Top-level maps that are not objects: no normaliser writes them, a hand-made record might.
MISSHAPEN = st.one_of(OBJECT, JSON)


def check(event: dict[str, Any]) -> None:
    """map_event + encode for every destination: a valid JSON body, or Skip / Unmappable."""
    for destination in DESTINATIONS:
        try:
            items = destination.map_event(event)  # type: ignore[arg-type]
        except (Skip, Unmappable) as refused:
            assert isinstance(refused.reason, str) and refused.reason
            continue
        assert isinstance(items, list)
        by_endpoint: dict[str, list[Item]] = {}
        for item in items:
            assert isinstance(item, Item) and item.endpoint in destination.endpoints
            assert isinstance(item.dedupe_id, str) and isinstance(item.user, str)
            by_endpoint.setdefault(item.endpoint, []).append(item)
        for name, endpoint_items in by_endpoint.items():
            endpoint = destination.endpoints[name]
            for start in range(0, len(endpoint_items), endpoint.max_items):
                request = destination.encode(endpoint, endpoint_items[start : start + endpoint.max_items])
                assert isinstance(request.body, bytes)
                orjson.loads(request.body)  # what the API receives is JSON


def base_event(**fields: Any) -> dict[str, Any]:
    made: dict[str, Any] = {
        "type": "track",
        "messageId": "m-1",
        "userId": "user-1",
        "anonymousId": "anon-1",
        "event": "Order Completed",
        "timestamp": "2026-11-22T10:00:00.000Z",
        "properties": {},
        "traits": {},
        "context": {},
        "integrations": {},
    }
    made.update(fields)
    return made


# Failures found (by hypothesis and in production), kept as regression examples.
@example(base_event(properties={"quantity": "1e999"}))
@example(base_event(properties={"quantity": float("nan")}))
@example(base_event(properties={"quantity": float("inf")}))
@example(base_event(properties={"quantity": 1e300}))
@example(base_event(properties={"quantity": 2**64}))
@example(base_event(properties={"revenue": 10**400}))
@example(base_event(properties={"value": "inf", "nested": {"n": 2**65}}))
@example(base_event(properties={"value": [2**70]}))
@example(base_event(context={"traits": ["not", "an", "object"]}))
@example(base_event(context={"traits": "a string", "device": ["x"], "os": 3, "app": None}))
@example(base_event(type="identify", traits={"email": "a@example.com", "phone": 2**64}))
@example(base_event(type="identify", traits={"email": "a@example.com", "total_purchases": float("nan")}))
@example(base_event(type="identify", traits={"email": "a@example.com", "age": {"big": 2**90}}))
@example(base_event(type="group", groupId="g", traits={"groupType": {"k": 1}, "size": 2**80}))
@example(base_event(type="page", name="\U0001f600", properties={"url": "/a|b"}, context={"traits": {"email": 5}}))
@example(base_event(timestamp="9999-12-31T23:59:59.999Z"))
@example(base_event(timestamp="0001-01-01T00:00:00.000Z"))
@example(
    base_event(
        type="identify", userId="u", traits={"email": "a@b.c", "plan": 2**64}, context={"location": {"city": 2**99}}
    )
)
@FUZZ
@given(normalised_events())
def test_any_normalised_event_maps_and_encodes_or_is_refused_with_a_reason(event: dict[str, Any]) -> None:
    check(event)


@example(base_event(properties=[1, 2]))
@example(base_event(context="not an object"))
@example(base_event(traits=7, type="identify"))
@example(base_event(properties=None, traits=None, context=None))
@FUZZ
@given(normalised_events(maps=MISSHAPEN))
def test_a_misshapen_event_is_refused_with_a_reason_never_a_crash(event: dict[str, Any]) -> None:
    check(event)


# -- responses -----------------------------------------------------------------------------------

HEADER_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "inf",
            "-inf",
            "nan",
            "1e309",
            "-5",
            "0",
            "3",
            "99999999999",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Mon, 01 Jan 0001 00:00:00 GMT",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ]
    ),
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda value: orjson.dumps(value) if _encodable(value) else b"{}"),
    st.sampled_from(
        [
            b'{"code":429,"throttled_users":{"user-1":31},"throttled_events":[0,99,-1,"x"],"exceeded_daily_quota_users":[1]}',
            b'{"code":400,"events_with_invalid_fields":{"time":[0,1e9,null]},"silenced_devices":"x","silenced_events":{}}',
            b'{"code":"duplicate_parameter","message":null}',
            b'The event should have the following params: [{"name": 5, "required": true}]',
        ]
    ),
)


def _encodable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


@FUZZ
@given(
    status=st.sampled_from([200, 201, 204, 400, 401, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504, 599]),
    body=BODIES,
    retry_after=HEADER_VALUES,
    reset=HEADER_VALUES,
)
def test_classify_takes_any_answer_and_every_hint_is_finite(
    status: int, body: bytes, retry_after: str, reset: str
) -> None:
    headers = {"Retry-After": retry_after, "x-sib-ratelimit-reset": reset}
    event = base_event(type="identify", traits={"email": "a@example.com"}, context={"device": {"id": "device-1"}})
    for destination in DESTINATIONS:
        for endpoint in destination.endpoints.values():
            items = [
                i
                for i in destination.map_event(base_event()) + destination.map_event(event)
                if i.endpoint == endpoint.name
            ]
            items = items[: endpoint.max_items] or [Item(endpoint.name, {"user_id": "user-1"}, "m-1", "user-1")]
            outcome = destination.classify(endpoint, items, status, body, headers)
            for index in range(len(items)):
                hint = outcome.for_item(index).retry_after
                assert hint is None or (math.isfinite(hint) and 0 <= hint <= MAX_HINT_SECONDS)


@FUZZ
@given(HEADER_VALUES)
def test_parse_retry_after_is_none_or_a_bounded_wait(value: str) -> None:
    seconds = parse_retry_after(value)
    assert seconds is None or (math.isfinite(seconds) and 0 <= seconds <= MAX_HINT_SECONDS)
