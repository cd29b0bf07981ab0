"""Amplitude HTTP V2 API (`POST /2/httpapi`): Segment events -> Amplitude events.

API reference (checked for this module):
- https://amplitude.com/docs/apis/analytics/http-v2 (request shape, limits, `options.min_id_length`)
- https://github.com/Amplitude-Developer-Docs/amplitude-dev-center/blob/main/docs/analytics/apis/http-v2-api.md
  ("Response Format": SuccessSummary, InvalidRequestError, PayloadTooLargeError,
  TooManyRequestsForDeviceError bodies)
- https://amplitude.com/docs/apis/analytics/http-api-batching-retries ("when a 400 response lists
  rejected events, remove those events and resend the rest"; retry 429 and 5xx)
- `events_with_invalid_id_lengths` and `silenced_events`/`silenced_devices` are real 400 fields that
  the reference page does not list; Amplitude's own SDKs drop exactly those indexes
  (https://github.com/amplitude/Amplitude-TypeScript/pull/81).

Response bodies this module classifies (all indexes point into the request's `events` array):
- 200 `{"code":200,"events_ingested":N,"payload_size_bytes":B,"server_upload_time":ms}`
- 400 `{"code":400,"error":"...","missing_field":"api_key","events_with_invalid_fields":{"time":[3]},
  "events_with_missing_fields":{"event_type":[4]},"events_with_invalid_id_lengths":{"user_id":[5]},
  "silenced_devices":["d1"],"silenced_events":[6]}`; nothing in the request was ingested.
- 413 `{"code":413,"error":"Payload too large"}`
- 429 `{"code":429,"error":"Too many requests for some devices and users","eps_threshold":30,
  "throttled_devices":{"d":31},"throttled_users":{"u":31},"exceeded_daily_quota_users":{...},
  "exceeded_daily_quota_devices":{...},"throttled_events":[3,4]}`; pause those users/devices ~30 s.

Where the Amplitude connector document (docs/MAPPINGS.md#amplitude) and the reference differ, the
reference wins: the document's "2,000 events / 20 MB per request" are the Batch API's limits, not
HTTP V2's (< 1 MB, < 2000 events; we send at most 1000, as the connector document's own best
practices say (docs/MAPPINGS.md#amplitude)).

Event fields (platform, idfa/idfv/adid, session_id, revenue fields, utm_*/referrer user properties)
follow the reference's "Keys for the Event Argument", held against rudder-transformer's `am`
destination and Segment's Actions Amplitude; the rules and where they deliberately differ are in
docs/MAPPINGS.md#amplitude.

Minimum id length: Amplitude rejects a `user_id`/`device_id` shorter than `min_id_length` (default 5)
with `events_with_invalid_id_lengths`. We never drop or pad short ids here: the API decides, the
event is dead-lettered with a reason naming the field, and operators who use short ids set
`AMPLITUDE_MIN_ID_LENGTH` (sent as `options.min_id_length`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from pydantic import Field, SecretStr

from worker.config_loader import Section
from worker.destinations.base import (
    INT64_MAX,
    Endpoint,
    Item,
    ItemResult,
    Outcome,
    Request,
    Skip,
    Unmappable,
    Verdict,
    as_object,
    classify_status,
    encoded_item,
    event_millis,
    finite_number,
    is_browser_event,
    item_json,
    object_field,
    parse_retry_after,
    text_of,
)
from worker.segment.event import SegmentEvent
from worker.segment.timestamps import InvalidTimestamp, millis_of

EVENTS_ENDPOINT = "events"
MAX_EVENTS_PER_REQUEST = 1000
# The API answers 413 at 1 MB; leave room for the {"api_key", "events", "options"} envelope around
# the items the runner measures.
MAX_REQUEST_BYTES = 1_000_000 - 10_000
# "Pause sending events for that user / device for a period of 30 seconds" (429 in the reference).
DEFAULT_THROTTLE_SECONDS = 30.0

# Amplitude event fields filled from Segment's `context`, as (field, path in context).
_CONTEXT_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("os_name", ("os", "name")),
    ("os_version", ("os", "version")),
    ("device_brand", ("device", "brand")),
    ("device_manufacturer", ("device", "manufacturer")),
    ("device_model", ("device", "model")),
    ("carrier", ("network", "carrier")),
    ("language", ("locale",)),
    ("country", ("location", "country")),
    ("region", ("location", "region")),
    ("city", ("location", "city")),
    ("location_lat", ("location", "latitude")),
    ("location_lng", ("location", "longitude")),
    ("ip", ("ip",)),
    ("app_version", ("app", "version")),
)


def _grouped_context_fields() -> tuple[tuple[str, tuple[tuple[str, str | None], ...]], ...]:
    """_CONTEXT_FIELDS as runs sharing their first key, in the same order: (first key, ((field,
    second key or None), ...)), so a mapping looks each context object up once (this runs per event)."""
    groups: list[tuple[str, list[tuple[str, str | None]]]] = []
    for field, path in _CONTEXT_FIELDS:
        second = path[1] if len(path) > 1 else None
        if groups and groups[-1][0] == path[0] and second is not None and groups[-1][1][0][1] is not None:
            groups[-1][1].append((field, second))
        else:
            groups.append((path[0], [(field, second)]))
    return tuple((first, tuple(fields)) for first, fields in groups)


_CONTEXT_GROUPS = _grouped_context_fields()

# `platform` (docs/MAPPINGS.md#amplitude, "platform"): the OS family as Amplitude's own SDKs spell it.
# Segment's mobile SDKs put it in context.device.type ("ios", "android"), RudderStack's too ("iOS",
# "Android", "ipados", "tvos" ...); context.os.name spells it as the OS reports itself ("iPhone OS"
# on old iOS). Keys are lower case; anything not listed (the UA enricher's "desktop" / "mobile" /
# "tablet" / "bot", "Windows", "Linux") names no platform.
_PLATFORMS = {
    "ios": "iOS",
    "iphone os": "iOS",
    "ipados": "iPadOS",
    "tvos": "tvOS",
    "watchos": "watchOS",
    "visionos": "visionOS",
    "macos": "macOS",
    "mac os x": "macOS",
    "mac os": "macOS",
    "android": "Android",
}
# Where Apple's IDFA/IDFV exist (RudderStack's isAppleFamily plus visionOS); macOS apps have neither
# in the sense Amplitude's `idfa`/`idfv` ("(iOS)") mean.
_APPLE_MOBILE = frozenset({"iOS", "iPadOS", "tvOS", "watchOS", "visionOS"})
# Mobile SDKs whose name alone says the platform, for events that carry no device or OS at all.
_LIBRARY_PLATFORMS = {
    "analytics-ios": "iOS",
    "analytics-android": "Android",
    "rudder-ios-library": "iOS",
    "com.rudderstack.android.sdk.core": "Android",
}
# An advertising id of zeros is what iOS (Limit Ad Tracking / ATT denied) and Android (ad id deleted)
# report instead of an id: sent as idfa/adid it would tie every such device together.
_ZERO_ID = re.compile(r"[0-]+")

# context.campaign key -> Amplitude user property (the names Amplitude's SDKs and Segment's Actions
# Amplitude use; `name` is the campaign, utm_campaign in the URL).
_CAMPAIGN_PROPERTIES = (
    ("source", "utm_source"),
    ("medium", "utm_medium"),
    ("name", "utm_campaign"),
    ("term", "utm_term"),
    ("content", "utm_content"),
)
# With the `$setOnce` name beside each: the first touch, as Amplitude's SDKs name it.
_CAMPAIGN_NAMES = tuple((key, name, f"initial_{name}") for key, name in _CAMPAIGN_PROPERTIES)
# Where Segment clients put Amplitude's session id: the classic destination's and Actions Amplitude's
# integration options (analytics.js plugins write them), then RudderStack's context.sessionId.
_SESSION_PATHS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("integrations", ("Amplitude", "session_id")),
    ("integrations", ("Actions Amplitude", "session_id")),
    ("context", ("sessionId",)),
)
NO_SESSION = -1  # "A session_id of -1 is the same as no session_id specified" (HTTP V2 reference)
_DIGITS = re.compile(r"[0-9]{1,19}")


class AmplitudeConfig(Section):
    """`AMPLITUDE_*` settings; the dict settings are JSON in the environment (tables shaped like those
    in docs/MAPPINGS.md#amplitude)."""

    env_prefix: ClassVar[str] = "AMPLITUDE_"

    api_key: SecretStr | None = None
    base_url: str = "https://api2.amplitude.com"  # EU: https://api.eu.amplitude.com
    min_id_length: int | None = Field(default=None, ge=1)
    event_mapping: dict[str, str] = {}  # Segment event name -> Amplitude event_type
    property_mapping: dict[str, str] = {}  # property / trait key -> Amplitude property key
    events_per_second: float = Field(default=1000, gt=0)  # project-wide upload rate the runner keeps under


class AmplitudeDestination:
    name = "amplitude"

    def __init__(self, config: AmplitudeConfig) -> None:
        self.config = config
        self.events_per_second: float | None = config.events_per_second
        self.base_urls: Mapping[str, str] = {"default": config.base_url}
        self.endpoints: Mapping[str, Endpoint] = {
            EVENTS_ENDPOINT: Endpoint(
                name=EVENTS_ENDPOINT,
                method="POST",
                base="default",
                path="/2/httpapi",
                max_items=MAX_EVENTS_PER_REQUEST,
                max_bytes=MAX_REQUEST_BYTES,
            )
        }

    # -- mapping ---------------------------------------------------------------------------------

    def map_event(self, event: SegmentEvent) -> list[Item]:
        kind = event.get("type")
        if kind == "alias":
            raise Skip("alias: Amplitude HTTP V2 has no alias call")
        if kind == "track":
            payloads = [self._track(event)]
        elif kind == "page":
            payloads = [self._viewed(event, "Page")]
        elif kind == "screen":
            payloads = [self._viewed(event, "Screen")]
        elif kind == "identify":
            payloads = [self._identify(event)]
        elif kind == "group":
            payloads = self._group(event)
        else:
            raise Unmappable(f"unsupported event type {kind!r}")
        return [_item(payload) for payload in payloads]  # each one encoded once, here: Unmappable if it cannot be

    def _track(self, event: SegmentEvent) -> dict[str, Any]:
        name = event.get("event")
        if not name:
            raise Unmappable("track without an event name")
        if not isinstance(name, str):
            raise Unmappable(f"event must be a string, got {type(name).__name__}")
        properties = object_field(event, "properties")
        payload = self._base(event, self._event_type(name))
        payload["event_properties"] = self._renamed(properties)
        payload.update(_revenue_fields(properties))
        self._add_user_properties(payload, event)
        return payload

    def _viewed(self, event: SegmentEvent, what: str) -> dict[str, Any]:
        """page -> "Viewed {name} Page" (or "Loaded a Page"); screen likewise with "Screen"."""
        name = event.get("name")
        event_type = f"Viewed {text_of(name)} {what}" if name else f"Loaded a {what}"
        properties = dict(object_field(event, "properties"))
        # Keep the page's name and category as properties too, so charts can group by them.
        for key in ("name", "category"):
            if event.get(key) and key not in properties:
                properties[key] = event[key]  # type: ignore[literal-required]
        payload = self._base(event, self._event_type(event_type))
        payload["event_properties"] = self._renamed(properties)
        self._add_user_properties(payload, event)
        return payload

    def _identify(self, event: SegmentEvent) -> dict[str, Any]:
        payload = self._base(event, "$identify")
        self._add_user_properties(payload, event)
        payload.setdefault("user_properties", {"$set": {}})  # an identify always says what it sets
        return payload

    def _group(self, event: SegmentEvent) -> list[dict[str, Any]]:
        """The user joins the group ($identify with `groups`); group traits become group properties.

        Amplitude only applies `group_properties` on a `$groupidentify` event, so traits beyond
        `groupType` need a second event. It gets its own insert_id: Amplitude dedupes by insert_id
        and would otherwise drop it as a repeat of the first.
        """
        group_id = event.get("groupId")
        if not group_id:
            raise Unmappable("group without groupId")
        traits = dict(object_field(event, "traits"))
        group_type = text_of(traits.pop("groupType", None) or "group")
        groups = {group_type: group_id}
        membership = self._base(event, "$identify")
        membership["groups"] = groups
        # Only the campaign and referrer: the group's traits are not the user's.
        attribution = _attribution(object_field(event, "context"))
        if attribution:
            membership["user_properties"] = attribution
        payloads = [membership]
        if traits:
            group_identify = self._base(event, "$groupidentify")
            group_identify["insert_id"] = f"{_message_id(event)}:groupidentify"
            group_identify["groups"] = groups
            group_identify["group_properties"] = {"$set": traits}
            payloads.append(group_identify)
        return payloads

    def _base(self, event: SegmentEvent, event_type: str) -> dict[str, Any]:
        """Fields every Amplitude event carries: ids, type, time, insert_id and the context fields."""
        context = object_field(event, "context")
        user_id = event.get("userId")
        device_id = _dig(context, ("device", "id")) or event.get("anonymousId")
        if not user_id and not device_id:
            raise Unmappable("neither userId nor anonymousId/context.device.id")
        payload: dict[str, Any] = {}
        if user_id:
            payload["user_id"] = text_of(user_id)
        if device_id:
            payload["device_id"] = text_of(device_id)
        payload["event_type"] = event_type
        payload["time"] = event_millis(event)
        payload["insert_id"] = _message_id(event)
        platform = _platform(context, event.get("channel"))
        if platform:
            payload["platform"] = platform
            payload.update(_device_ids(context, platform))
        payload["session_id"] = _session_id(event, context)
        for first, fields in _CONTEXT_GROUPS:  # inlined _dig, one lookup per context object
            value = context.get(first)
            if value is None:
                continue
            if fields[0][1] is None:  # a top-level context field (locale, ip)
                if value != "":
                    payload[fields[0][0]] = value
            elif value.__class__ is dict:
                for field, second in fields:
                    nested = value.get(second)
                    if nested is not None and nested != "":
                        payload[field] = nested
        library = _library(context)
        if library:
            payload["library"] = library
        return payload

    def _add_user_properties(self, payload: dict[str, Any], event: SegmentEvent) -> None:
        """Traits under `$set`, with the campaign and referrer as Amplitude's SDKs record them."""
        traits = _user_traits(event)
        attribution = _attribution(object_field(event, "context"))
        if not traits and not attribution:
            return
        # The campaign and referrer are this event's; a trait of the same name (utm_source, referrer)
        # is whatever the client cached earlier, so the event's own attribution wins.
        user_properties: dict[str, Any] = {"$set": {**self._renamed(traits), **attribution.get("$set", {})}}
        if "$setOnce" in attribution:
            user_properties["$setOnce"] = attribution["$setOnce"]
        payload["user_properties"] = user_properties

    def _event_type(self, name: str) -> str:
        return self.config.event_mapping.get(name, name)

    def _renamed(self, properties: Mapping[str, Any]) -> dict[str, Any]:
        mapping = self.config.property_mapping
        if not mapping:  # the usual case: a plain copy (C), not a comprehension over every key
            return dict(properties)
        return {mapping.get(key, key): value for key, value in properties.items()}

    # -- requests --------------------------------------------------------------------------------

    def encode(self, endpoint: Endpoint, items: Sequence[Item]) -> Request:
        body: dict[str, Any] = {"api_key": self._api_key(), "events": [item_json(item) for item in items]}
        if self.config.min_id_length is not None:
            body["options"] = {"min_id_length": self.config.min_id_length}
        return Request(
            method=endpoint.method,
            base=endpoint.base,
            path=endpoint.path,
            headers={"Content-Type": "application/json", "Accept": "*/*"},
            body=orjson.dumps(body),
        )

    def _api_key(self) -> str:
        key = self.config.api_key
        return key.get_secret_value() if key is not None else ""

    # -- responses -------------------------------------------------------------------------------

    def classify(
        self, endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, headers: Mapping[str, str]
    ) -> Outcome:
        if status == 400:
            return _classify_bad_request(items, body, headers)
        if status == 429:
            return _classify_throttled(items, body, headers)
        return Outcome(status, classify_status(status, body, headers))


def make(config: AmplitudeConfig | None = None) -> AmplitudeDestination:
    return AmplitudeDestination(config if config is not None else AmplitudeConfig())


# -- response classification (pure) ------------------------------------------------------------


def _classify_bad_request(items: Sequence[Item], body: bytes, headers: Mapping[str, str]) -> Outcome:
    """A 400 names the bad events by index: those are permanent, the rest were rejected with them."""
    parsed = _json_object(body)
    rejected = _rejected_indexes(parsed, items)
    if rejected:
        per_item = {index: ItemResult(Verdict.PERMANENT, reason) for index, reason in rejected.items()}
        return Outcome(400, ItemResult(Verdict.RESEND, "a batch-mate was rejected"), per_item)
    error = str(parsed.get("error", ""))
    if error.startswith("Invalid API key"):
        # A wrong key is the deployment's fault, not the events': back off (the sink pauses) until
        # an operator fixes AMPLITUDE_API_KEY; exhausted retries still end in the DLQ.
        return Outcome(400, ItemResult(Verdict.RETRY, f"HTTP 400: {error} (check AMPLITUDE_API_KEY)"))
    return Outcome(400, classify_status(400, body, headers))


def _rejected_indexes(parsed: Mapping[str, Any], items: Sequence[Item]) -> dict[int, str]:
    """Index -> reason for every event the 400 body names (by index, or by silenced device)."""
    reasons: dict[int, str] = {}
    per_field = (
        ("events_with_invalid_fields", "invalid field {}"),
        ("events_with_missing_fields", "missing field {}"),
        ("events_with_invalid_id_lengths", "{} shorter than min_id_length"),
    )
    for key, template in per_field:
        fields = parsed.get(key)
        if isinstance(fields, Mapping):
            for field, indexes in fields.items():
                for index in _valid_indexes(indexes, len(items)):
                    reasons.setdefault(index, f"HTTP 400: {template.format(field)}")
    for index in _valid_indexes(parsed.get("silenced_events"), len(items)):
        reasons.setdefault(index, "HTTP 400: device silenced by Amplitude")
    silenced_devices = parsed.get("silenced_devices")
    if isinstance(silenced_devices, list):
        silenced = {str(device) for device in silenced_devices}
        for index, item in enumerate(items):
            if item.payload.get("device_id") in silenced:
                reasons.setdefault(index, "HTTP 400: device silenced by Amplitude")
    return reasons


def _classify_throttled(items: Sequence[Item], body: bytes, headers: Mapping[str, str]) -> Outcome:
    """Hold back only the throttled users/devices; the others were refused with them, resend now."""
    parsed = _json_object(body)
    throttled_users = _keys(parsed, "throttled_users")
    throttled_devices = _keys(parsed, "throttled_devices")
    quota_users = _keys(parsed, "exceeded_daily_quota_users")
    quota_devices = _keys(parsed, "exceeded_daily_quota_devices")
    throttled_events = set(_valid_indexes(parsed.get("throttled_events"), len(items)))
    retry_after = parse_retry_after(_header_value(headers, "Retry-After"))
    wait = retry_after if retry_after is not None else DEFAULT_THROTTLE_SECONDS

    per_item: dict[int, ItemResult] = {}
    for index, item in enumerate(items):
        payload = item.payload  # read back from the item's bytes: once, not once per field
        user_id = payload.get("user_id")
        device_id = payload.get("device_id")
        if user_id in quota_users or device_id in quota_devices:
            reason = "HTTP 429: exceeded daily quota"
        elif user_id in throttled_users or device_id in throttled_devices or index in throttled_events:
            reason = "HTTP 429: user/device throttled"
        else:
            continue
        per_item[index] = ItemResult(Verdict.THROTTLED, reason, wait)
    if not per_item:  # a plain 429 (or one naming nobody in this request): back off the whole request
        return Outcome(429, classify_status(429, body, headers))
    return Outcome(429, ItemResult(Verdict.RESEND, "a batch-mate was throttled"), per_item)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _header_value(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def _valid_indexes(indexes: object, count: int) -> list[int]:
    if not isinstance(indexes, list):
        return []
    return [i for i in indexes if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count]


def _keys(parsed: Mapping[str, Any], key: str) -> set[str]:
    value = parsed.get(key)
    return {str(k) for k in value} if isinstance(value, Mapping) else set()


# -- mapping helpers (pure) --------------------------------------------------------------------


def _item(payload: dict[str, Any]) -> Item:
    return encoded_item(
        EVENTS_ENDPOINT,
        payload,
        str(payload["insert_id"]),
        str(payload.get("user_id") or payload.get("device_id") or ""),
    )


def _message_id(event: SegmentEvent) -> str:
    """The insert_id Amplitude dedupes by; the normaliser always fills messageId, so absence is a bug."""
    message_id = event.get("messageId")
    if not message_id:
        raise Unmappable("missing messageId (the insert_id)")
    return text_of(message_id)


def _user_traits(event: SegmentEvent) -> dict[str, Any]:
    """The user's traits: context.traits (sent with any call) overridden by an identify's own traits."""
    # context.traits is whatever the producer sent with the call: a value that is not an object is
    # ignored (the event is still good); the event's own `traits` is always an object when normalised.
    context_traits = as_object(object_field(event, "context").get("traits"))
    if event.get("type") == "group":  # a group call's traits describe the group, not the user
        return dict(context_traits)
    return {**context_traits, **object_field(event, "traits")}


def _revenue_fields(properties: Mapping[str, Any]) -> dict[str, Any]:
    """Amplitude's revenue fields, only for an event that states its `revenue` (docs/MAPPINGS.md#amplitude).

    Amplitude books revenue for any event with a top-level `price` ("Required for revenue data if
    the revenue field is not sent"), so price and quantity go to the top level only beside a revenue:
    Product Viewed / Product Added carry a price, but no money changed hands. RudderStack's rule
    (revenue fields when `properties.revenue` is set); Segment's Actions Amplitude sends them only for
    Order Completed. The properties stay in event_properties either way.
    """
    # A numeric value that is not a finite double (nan, inf, "1e999") or, for quantity (an integer), is
    # beyond 64 bits is a bad event (Unmappable, with the property named); a value that is not numeric
    # at all is not a revenue field and stays only in event_properties.
    revenue = finite_number(properties.get("revenue"), "properties.revenue")
    if revenue is None:
        return {}
    fields: dict[str, Any] = {"revenue": revenue}
    price = finite_number(properties.get("price"), "properties.price")
    if price is not None:
        fields["price"] = price
    quantity = _quantity(properties.get("quantity"))
    if quantity is not None:
        fields["quantity"] = quantity
    product_id = properties.get("productId", properties.get("product_id"))
    revenue_type = properties.get("revenueType", properties.get("revenue_type"))
    if product_id not in (None, ""):
        fields["productId"] = text_of(product_id)
    if revenue_type not in (None, ""):
        fields["revenueType"] = text_of(revenue_type)
    return fields


def _quantity(value: Any) -> int | None:
    """Amplitude's quantity is an integer: a fractional one is rounded half up, as Segment's Actions
    Amplitude does (JavaScript's Math.round: 2.5 -> 3, -2.5 -> -2), not truncated (2.9 is not 2)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number: int = value  # exact: no round trip through float
    else:
        real = finite_number(value, "properties.quantity")
        if real is None:
            return None
        number = math.floor(real + 0.5)
    if not -INT64_MAX - 1 <= number <= INT64_MAX:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise Unmappable(f"properties.quantity is out of the 64-bit integer range: {shown}")
    return number


def _platform(context: Mapping[str, Any], channel: Any) -> str | None:
    """The platform Amplitude's SDKs would report: the OS family for apps, `Web` for browsers.

    1. context.device.type when it names an OS family (what Segment's and RudderStack's mobile SDKs
       send), properly cased as Amplitude spells it: "ios" -> "iOS", "android" -> "Android";
    2. `Web` for a browser: library analytics.js (Segment's rule), channel web/browser
       (RudderStack's), or a browser user agent (`Mozilla/...`). The UA enricher's device.type
       (desktop/mobile/tablet) is a form factor, never a platform;
    3. context.os.name when it names a mobile OS (an app event without a device type);
    4. a mobile SDK's library name;
    5. nothing: no platform is made up.
    """
    device_type = _dig(context, ("device", "type"))
    if isinstance(device_type, str) and (named := _PLATFORMS.get(device_type.strip().lower())):
        return named
    if is_browser_event(context, channel):
        return "Web"
    library = _dig(context, ("library", "name"))
    library = library if isinstance(library, str) else ""  # an object is unhashable: no dict lookups
    os_name = _dig(context, ("os", "name"))
    if isinstance(os_name, str) and (named := _PLATFORMS.get(os_name.strip().lower())):
        return named
    return _LIBRARY_PLATFORMS.get(library)


def _device_ids(context: Mapping[str, Any], platform: str) -> dict[str, str]:
    """Attribution ids (HTTP V2: `idfa`/`idfv` "(iOS)", `adid` "(Android)"), as RudderStack picks them:
    context.device.advertisingId is the IDFA on Apple devices and the Google advertising id on
    Android; context.device.id is the IDFV on Apple devices (Segment's and RudderStack's iOS SDKs
    fill it with identifierForVendor). Nothing for the web, where neither exists."""
    device = as_object(context.get("device"))
    advertising_id = device.get("advertisingId")
    if not isinstance(advertising_id, str) or not advertising_id or _ZERO_ID.fullmatch(advertising_id):
        advertising_id = None
    ids: dict[str, str] = {}
    if platform in _APPLE_MOBILE:
        if advertising_id:
            ids["idfa"] = advertising_id
        vendor_id = device.get("id")
        if isinstance(vendor_id, str) and vendor_id and not _ZERO_ID.fullmatch(vendor_id):
            ids["idfv"] = vendor_id
    elif platform == "Android" and advertising_id:
        ids["adid"] = advertising_id
    return ids


def _session_id(event: SegmentEvent, context: Mapping[str, Any]) -> int:
    """Amplitude's session_id (the session's start, ms since the epoch) from the first place a client
    put one (_SESSION_PATHS); -1 ("no session") when none holds a usable one."""
    for top, path in _SESSION_PATHS:
        source = context if top == "context" else as_object(event.get(top))
        session = _session_millis(_dig(source, path))
        if session is not None:
            return session
    return NO_SESSION


def _session_millis(value: Any) -> int | None:
    """A session start as a positive 64-bit integer of milliseconds, else None (treated as absent,
    never an error: a bad session id must not lose the event). Accepts integers, integral-valued
    floats, digit strings (Segment's formatSessionId) and ISO-8601 dates (Segment's session_id is a
    datetime field)."""
    if value is None or isinstance(value, bool):
        return None
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = int(value) if math.isfinite(value) and abs(value) <= INT64_MAX else None
    elif isinstance(value, str):
        text = value.strip()
        if _DIGITS.fullmatch(text):
            number = int(text)
        elif text and not text.lstrip("+-").isdigit():
            try:
                number = millis_of(text)
            except (InvalidTimestamp, ValueError, OverflowError, TypeError, OSError):
                number = None  # not a date either: no session
    if number is None or not 0 < number <= INT64_MAX:
        return None
    return number


def _attribution(context: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """context.campaign and context.page.referrer as Amplitude's SDKs record them: the latest touch
    under `$set` (utm_source ..., referrer), the first one under `$setOnce` (initial_utm_source ...,
    initial_referrer). {} when the event carries neither."""
    latest: dict[str, str] = {}
    first: dict[str, str] = {}
    campaign = context.get("campaign")
    if campaign.__class__ is dict:
        for key, name, initial in _CAMPAIGN_NAMES:
            value = _attribution_text(campaign.get(key))
            if value is not None:
                latest[name] = first[initial] = value
    page = context.get("page")
    referrer = _attribution_text(page.get("referrer")) if page.__class__ is dict else None
    if referrer is not None:
        latest["referrer"] = first["initial_referrer"] = referrer
    if not latest:
        return {}
    return {"$set": latest, "$setOnce": first}


def _attribution_text(value: Any) -> str | None:
    """A campaign or referrer value as text (they come from a URL); None when empty or not a scalar."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _library(context: Mapping[str, Any]) -> str | None:
    name = _dig(context, ("library", "name"))
    if not name:
        return None
    version = _dig(context, ("library", "version"))
    return f"{text_of(name)}/{text_of(version)}" if version else text_of(name)


def _dig(mapping: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = mapping
    for key in path:
        if not isinstance(value, dict):  # decoded JSON: always dict; ABC checks cost ~10% of the sink's CPU
            return None
        value = value.get(key)
    return value
