"""Reteno: Segment events -> anonymous devices, contacts and events (docs/MAPPINGS.md#reteno).

Endpoints (Reteno is built on the eSputnik/Yespo platform and shares its public API):
- `POST {mobile}/api/v1/device` registers a device, optionally linked to a user. Body fields as the
  Reteno SDKs send them (reteno-com/reteno-mobile-android-sdk, `DeviceRemote`: deviceId,
  externalUserId, pushToken, category MOBILE|TABLET, osType ANDROID|IOS, osVersion, deviceModel,
  appVersion, languageCode, timeZone) and as Reteno's Amplitude integration guide shows
  (docs/MAPPINGS.md#reteno).
- `POST {default}/api/v1/contact` adds or updates one contact synchronously
  (https://docs.reteno.com/docs/real-time-contact-updating,
  https://docs.reteno.com/docs/adding-new-users): `channels` is required, custom fields are
  `{"id": <field id>, "value": ...}`, the external id is `externalCustomerId`.
- `POST {default}/api/v2/event` generates one event
  (https://docs.reteno.com/docs/validating-event-parameters,
  https://docs.esputnik.com/docs/using-the-generate-event-api-resource): `eventTypeKey` (max 100
  characters, none of `< ; ' \\ / | " ` ^ ? ! , >`), `keyValue` (determines the event's uniqueness,
  max 300), `params` as a list of `{"name", "value"}`, which must carry a contact identifier
  (externalCustomerId, email, ...). Content is limited to 20 KB per event.
All three take the `X-Reteno-Access-Key` header
(https://docs.yespo.io/reference/managing-mobile-sdk-access-keys) and one item per request.

Rate limits (https://docs.reteno.com/reference/rate-limits, the same table as
https://docs.yespo.io/reference/rate-limits): "Generate event v2" `POST /api/v2/event` allows 350
requests/s; methods the table does not list, `POST /api/v1/contact` among them, "share a total
default rate limit of 200 requests per second". Every item is one request, so the sink keeps all of
its requests together under `RETENO_EVENTS_PER_SECOND` (default 200), which keeps the contact calls
within the shared 200 and the events under their 350; 429s are still retried with backoff.

Where the guide and the API reference differ, the API reference wins:
- the guide's contact template always sends the email channel, with an empty value when the user has
  no email; the API requires a real channel, so a contact is sent only when it has one;
- the guide renders missing values as "" (FreeMarker `!`); sending "" would blank the stored field,
  so missing values are left out instead;
- the guide's event payload has no `keyValue`; we set it to the Segment messageId so redelivery is
  recognised as the same event (docs/ARCHITECTURE.md#guarantees: dedupe keys come from messageId), and put the contact
  identifier in `params` as the API asks when keyValue is not the contact key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

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
    is_browser_event,
    object_field,
    one_item_request,
    text_of,
)
from worker.segment.event import SegmentEvent

ACCESS_KEY_HEADER = "X-Reteno-Access-Key"

DEVICES = Endpoint("devices", "POST", "mobile", "/api/v1/device")
CONTACTS = Endpoint("contacts", "POST", "default", "/api/v1/contact")
EVENTS = Endpoint("events", "POST", "default", "/api/v2/event", max_bytes=20 * 1024)

EVENT_TYPE_KEY_MAX = 100
OS_TYPES = ("IOS", "ANDROID")
KEY_VALUE_MAX = 300
# Characters the API refuses in eventTypeKey and keyValue.
_FORBIDDEN_KEY_CHARS = re.compile(r"[<;\u2019'\\/|\"`^?!,>]")
# The documented 400 body of an event type with parameter validation switched on.
_REQUIRED_PARAMS_PREFIX = "The event should have the following params"
# https://docs.reteno.com/reference/rate-limits: "The methods not listed in this table share a total
# default rate limit of 200 requests per second" (POST /api/v1/contact is not listed; POST
# /api/v2/event is, at 350). One bucket for all our requests at 200 keeps under both.
DOCUMENTED_REQUESTS_PER_SECOND = 200.0


class RetenoConfig(Section):
    env_prefix: ClassVar[str] = "RETENO_"

    access_key: SecretStr | None = None
    base_url: str = "https://api.reteno.com"
    mobile_base_url: str = "https://mobile-api.reteno.com"
    # Where each Reteno custom field (by id) takes its value from (JSON in RETENO_CONTACT_FIELDS):
    # a trait name (`plan`), `userId`/`anonymousId`, or a dotted path into the event
    # (`context.location.city`, `traits.plan`). Field ids are per account, so there is no default.
    contact_fields: dict[str, int] = {}
    # Reteno's guide (docs/MAPPINGS.md#reteno): "category": "MOBILE" is hard-coded and mandatory on device
    # registration. The API's enum (SDK `DeviceCategoryRemote`) is MOBILE | TABLET: anything else would
    # have every device refused with a 400, so a typo stops the command at start instead.
    category: Literal["MOBILE", "TABLET"] = "MOBILE"
    # The guide's contact payload names the app on the channel (`device.appId`); sent when set.
    app_id: str | None = None
    # Requests per second the sink keeps under (one item a request), from Reteno's documented limits.
    events_per_second: float = Field(default=DOCUMENTED_REQUESTS_PER_SECOND, gt=0)


class Reteno:
    """The Reteno destination: identify -> device + contact, track/page/screen -> event."""

    name = "reteno"

    def __init__(self, config: RetenoConfig) -> None:
        self.config = config
        self.endpoints: Mapping[str, Endpoint] = {e.name: e for e in (DEVICES, CONTACTS, EVENTS)}
        self.base_urls: Mapping[str, str] = {"default": config.base_url, "mobile": config.mobile_base_url}
        self.events_per_second: float | None = config.events_per_second  # 429s are still retried with backoff

    def map_event(self, event: SegmentEvent) -> list[Item]:
        kind = event.get("type")
        if kind == "identify":
            return self._identify_items(event)
        if kind in ("track", "page", "screen"):
            return [self._event_item(event)]
        raise Skip(f"reteno has no {kind} call")

    def encode(self, endpoint: Endpoint, items: Sequence[Item]) -> Request:
        key = self.config.access_key
        return one_item_request(self.name, endpoint, items, {ACCESS_KEY_HEADER: key.get_secret_value()} if key else {})

    def classify(
        self, endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, headers: Mapping[str, str]
    ) -> Outcome:
        result = classify_status(status, body, headers)
        if status == 400 and endpoint.name == EVENTS.name:
            result = _classify_event_400(body, result)
        elif status == 401:
            result = ItemResult(Verdict.RETRY, f"{result.reason} (check RETENO_ACCESS_KEY)", result.retry_after)
        return Outcome(status, result)

    # -- identify ---------------------------------------------------------------------------------

    def _identify_items(self, event: SegmentEvent) -> list[Item]:
        items = [self._item(DEVICES, device_payload(event, self.config.category), event)]
        contact = contact_payload(event, self.config.contact_fields, self.config.app_id)
        if contact is not None:
            items.append(self._item(CONTACTS, contact, event))
        return items

    # -- track / page / screen --------------------------------------------------------------------

    def _event_item(self, event: SegmentEvent) -> Item:
        return self._item(EVENTS, event_payload(event), event)

    @staticmethod
    def _item(endpoint: Endpoint, payload: dict[str, Any], event: SegmentEvent) -> Item:
        user = text_of(event.get("userId") or event.get("anonymousId"))
        return encoded_item(endpoint.name, payload, text_of(event.get("messageId")), user)


def device_payload(event: SegmentEvent, category: str) -> dict[str, Any]:
    """The device an identify carries (docs/MAPPINGS.md#reteno, "anonymous users" destination)."""
    context = object_field(event, "context")
    device = as_object(context.get("device"))
    os_info = as_object(context.get("os"))
    app = as_object(context.get("app"))
    device_id = device.get("id") or event.get("anonymousId")
    if not device_id:
        raise Unmappable("identify has neither context.device.id nor anonymousId")
    payload: dict[str, Any] = {"deviceId": text_of(device_id), "category": category}
    optional = {
        "externalUserId": event.get("userId"),
        "osType": _app_os_type(event, context, device, os_info),
        "appVersion": app.get("version"),
        "osVersion": os_info.get("version"),
        "deviceModel": device.get("model"),
    }
    payload.update({key: text_of(value) for key, value in optional.items() if value not in (None, "")})
    return payload


def os_type(os_name: Any) -> str | None:
    """Reteno's guide (docs/MAPPINGS.md#reteno) upper-cases the OS name; the API's enum (SDK
    `DeviceOsRemote`) is IOS | ANDROID only, so other systems (Windows, Mac OS X ...) are left out
    rather than refused with a 400."""
    if not isinstance(os_name, str):
        return None
    upper = os_name.strip().upper()
    upper = "IOS" if upper in ("IPADOS", "IPHONE OS") else upper
    return upper if upper in OS_TYPES else None


def _app_os_type(
    event: SegmentEvent, context: Mapping[str, Any], device: Mapping[str, Any], os_info: Mapping[str, Any]
) -> str | None:
    """osType for an app's device; None for a browser.

    The guide's `os_name` is Amplitude's, which for a browser event is the browser ("Chrome",
    "Mobile Safari": not IOS/ANDROID, so never an osType). Segment's context.os.name is the OS the
    browser runs on (the UA enricher fills it), and would register a phone's browser as an iOS or
    Android app device. A mobile SDK names its OS in device.type ("ios", "android"); without one, a
    browser shows as analytics.js, channel web/browser or a `Mozilla/` user agent (the rule
    docs/MAPPINGS.md#amplitude uses for platform `Web`).
    """
    from_device_type = os_type(device.get("type"))
    if from_device_type is not None:
        return from_device_type
    if is_browser_event(context, event.get("channel")):
        return None
    return os_type(os_info.get("name"))


def contact_payload(
    event: SegmentEvent, contact_fields: Mapping[str, int], app_id: str | None
) -> dict[str, Any] | None:
    """The contact an identify describes, or None when it has no channel to create one with."""
    traits = object_field(event, "traits")
    channel: dict[str, Any] = {"type": "email", "value": traits.get("email")}
    if not isinstance(channel["value"], str) or not channel["value"]:
        # The API requires `channels`; without an email there is nothing to create the contact
        # with. The device registration still links the user to the device.
        return None
    if app_id:
        channel = {"device": {"appId": app_id}, **channel}
    payload: dict[str, Any] = {"channels": [channel]}
    fields = []
    for source, field_id in contact_fields.items():
        value = _lookup(event, source)
        if value is not None and value != "":
            fields.append({"id": field_id, "value": as_text(value)})
    if fields:
        payload["fields"] = fields
    if event.get("userId"):
        payload["externalCustomerId"] = text_of(event["userId"])
    return payload


def event_payload(event: SegmentEvent) -> dict[str, Any]:
    """A track/page/screen as a Reteno v2 event; messageId becomes keyValue (the dedupe key)."""
    user_id = text_of(event.get("userId"))
    params = [{"name": "externalCustomerId", "value": user_id}] if user_id else []
    properties = object_field(event, "properties")
    if not params:
        email = as_object(object_field(event, "context").get("traits")).get("email")
        if not email:
            # Reteno's events API identifies the contact by externalCustomerId, email, phone or
            # push token only; an anonymous device id is not one of them.
            raise Skip("reteno events need a userId or an email to find the contact")
        params.append({"name": "email", "value": text_of(email)})
    for name, value in properties.items():
        if value is not None and name not in ("externalCustomerId", "email"):
            params.append({"name": str(name), "value": as_text(value)})
    return {"eventTypeKey": event_type_key(event), "keyValue": key_value(event), "params": params}


def event_type_key(event: SegmentEvent) -> str:
    """Track: the event name. Page/screen: Segment's "Viewed <name> Page|Screen" naming."""
    kind = event.get("type")
    if kind == "track":
        raw = text_of(event.get("event"))
    else:
        noun = "Page" if kind == "page" else "Screen"
        name = event.get("name")
        raw = f"Viewed {text_of(name)} {noun}" if name else f"Loaded a {noun}"
    key = " ".join(_FORBIDDEN_KEY_CHARS.sub(" ", raw).split())[:EVENT_TYPE_KEY_MAX]
    if not key:
        raise Unmappable(f"event name {raw[:64]!r} leaves no valid Reteno eventTypeKey")
    return key


def key_value(event: SegmentEvent) -> str:
    """The event's keyValue: its messageId, or a digest of it when the API would refuse it as is."""
    message_id = text_of(event.get("messageId"))
    if not message_id:
        raise Unmappable("event has no messageId to use as Reteno keyValue")
    if len(message_id) <= KEY_VALUE_MAX and not _FORBIDDEN_KEY_CHARS.search(message_id):
        return message_id
    return "mid-" + hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()


def as_text(value: Any) -> str:
    """Reteno param and field values are strings (the guide renders every value as "${...}")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # holds an integer beyond 64 bits (or a string that is not valid UTF-8)
        return str(value)


def _classify_event_400(body: bytes, default: ItemResult) -> ItemResult:
    text = body.decode("utf-8", "replace")
    if text.lstrip().startswith(_REQUIRED_PARAMS_PREFIX):
        names = re.findall(r'"name"\s*:\s*"([^"]*)"\s*,\s*"required"\s*:\s*true', text)
        return ItemResult(Verdict.PERMANENT, f"HTTP 400: event type requires params {names}")
    return default


def _lookup(event: SegmentEvent, source: str) -> Any:
    if source in ("userId", "anonymousId", "messageId"):
        return event.get(source)
    if "." not in source:
        return as_object(event.get("traits")).get(source)
    node: Any = event
    for part in source.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def make(config: RetenoConfig | None = None) -> Reteno:
    return Reteno(config or RetenoConfig())
