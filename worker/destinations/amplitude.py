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

Minimum id length: Amplitude rejects a `user_id`/`device_id` shorter than `min_id_length` (default 5)
with `events_with_invalid_id_lengths`. We never drop or pad short ids here: the API decides, the
event is dead-lettered with a reason naming the field, and operators who use short ids set
`AMPLITUDE_MIN_ID_LENGTH` (sent as `options.min_id_length`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from pydantic import Field, SecretStr

from worker.config_loader import Section
from worker.destinations.base import (
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
    int64,
    item_json,
    object_field,
    parse_retry_after,
    text_of,
)
from worker.segment.event import SegmentEvent

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
_CONTEXT_PATHS = tuple((field, path[0], path[1] if len(path) > 1 else None) for field, path in _CONTEXT_FIELDS)


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
        payload["user_properties"] = {"$set": self._renamed(_user_traits(event))}
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
        platform = _platform(context)
        if platform:
            payload["platform"] = platform
        for field, first, second in _CONTEXT_PATHS:  # inlined _dig: this runs 16 times an event
            value = context.get(first)
            if second is not None:
                value = value.get(second) if value.__class__ is dict else None
            if value is not None and value != "":
                payload[field] = value
        library = _library(context)
        if library:
            payload["library"] = library
        return payload

    def _add_user_properties(self, payload: dict[str, Any], event: SegmentEvent) -> None:
        traits = _user_traits(event)
        if traits:
            payload["user_properties"] = {"$set": self._renamed(traits)}

    def _event_type(self, name: str) -> str:
        return self.config.event_mapping.get(name, name)

    def _renamed(self, properties: Mapping[str, Any]) -> dict[str, Any]:
        mapping = self.config.property_mapping
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
        user_id = item.payload.get("user_id")
        device_id = item.payload.get("device_id")
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
    """Amplitude's revenue fields from Segment's ecommerce properties (revenue, price, quantity...)."""
    # A numeric value that is not a finite double (nan, inf, "1e999") or, for quantity (an integer), is
    # beyond 64 bits is a bad event (Unmappable, with the property named); a value that is not numeric
    # at all is not a revenue field and stays only in event_properties.
    fields: dict[str, Any] = {}
    for field in ("revenue", "price"):
        number = finite_number(properties.get(field), f"properties.{field}")
        if number is not None:
            fields[field] = number
    quantity = int64(properties.get("quantity"), "properties.quantity")
    if quantity is not None:
        fields["quantity"] = quantity
    # Amplitude ignores productId/revenueType unless revenue or price comes with them.
    if "revenue" in fields or "price" in fields:
        product_id = properties.get("productId", properties.get("product_id"))
        revenue_type = properties.get("revenueType", properties.get("revenue_type"))
        if product_id not in (None, ""):
            fields["productId"] = text_of(product_id)
        if revenue_type not in (None, ""):
            fields["revenueType"] = text_of(revenue_type)
    return fields


def _platform(context: Mapping[str, Any]) -> str | None:
    device_type = _dig(context, ("device", "type"))
    if device_type:
        return text_of(device_type)
    # Browsers send a user agent and no device type (analytics.js); Amplitude calls that "Web".
    return "Web" if context.get("userAgent") else None


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
