"""Brevo: Segment track/page/screen -> Brevo events, identify -> contact upsert.

API reference (current Brevo API, `api-key` header on every request,
https://developers.brevo.com/docs/how-it-works):
- `POST /v3/events` "Create an event" (https://developers.brevo.com/reference/create-event,
  https://developers.brevo.com/docs/event-endpoints): `event_name` (required, <= 255 characters,
  only letters, digits, `-` and `_`), `identifiers` (required, at least one of `email_id`, `ext_id`,
  `phone_id`, `contact_id` ...), `contact_properties` (attribute -> string/number/boolean),
  `event_properties` (keys limited like event_name, 50 KB), `event_date` (ISO 8601); we send
  `email_id`, `ext_id` and `phone_id` (the SMS attribute, "SMS associated with the event"). Answers 204
  with no body. There is no idempotency key, so the Segment messageId travels as
  `event_properties.messageId` (what the stand-in dedupes on). `POST /v3/events/batch` exists but
  answers 202 and processes asynchronously, so per-event failures would never reach us.
- `POST /v3/contacts` "Create a contact" (https://developers.brevo.com/reference/create-contact,
  https://developers.brevo.com/docs/synchronise-contact-lists): `email`, `ext_id`, `attributes`
  (names in capitals, must exist in the account; `SMS` carries the phone), `listIds`,
  `updateEnabled` (true = upsert). A contact may be created by email, by the SMS attribute or by
  ext_id. Answers 201 `{"id": ...}` when created, 204 when an existing contact was updated.
- Errors are `{"code": "...", "message": "..."}` (codes such as `invalid_parameter`,
  `missing_parameter`, `duplicate_parameter`, `unauthorized`). 429 carries `x-sib-ratelimit-limit`,
  `x-sib-ratelimit-remaining` and `x-sib-ratelimit-reset` (seconds) and no Retry-After
  (https://developers.brevo.com/docs/limit-headers).
- Rate limits (https://developers.brevo.com/docs/api-limits, "General rate limits", the tier every
  account has, Free included): `POST /v3/events` 36,000 requests/hour and 10 requests/s; all
  endpoints under `/v3/contacts/{...}` likewise 36,000 RPH and 10 RPS (the Advanced and Extended
  tiers of Professional and Enterprise accounts allow 20 and 60 RPS). Every item is one request, so
  the sink keeps all of its requests together under `BREVO_EVENTS_PER_SECOND` (default 10), which
  keeps each endpoint under its own 10 RPS; accounts on a higher tier raise it.

Field mappings follow the Amplitude-connector tables in docs/MAPPINGS.md#brevo (event names -> Brevo
event names, user properties -> contact attributes such as FIRSTNAME/LASTNAME/SMS, list ids), with
Segment's trait names as keys.

Events without an identifier Brevo can use (no userId, no email, no phone) are skipped, not
dead-lettered: anonymous traffic is normal, Brevo only tracks known contacts, and a replay could not
repair such an event, so a DLQ entry would only be noise. The skip is counted with its reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import orjson
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from worker.config_loader import Section
from worker.destinations.base import (
    INT64_MAX,
    INT64_MIN,
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
    object_field,
    one_item_request,
    parse_seconds,
    text_of,
)
from worker.segment.event import SegmentEvent

API_KEY_HEADER = "api-key"
RATE_LIMIT_RESET_HEADER = "x-sib-ratelimit-reset"

EVENTS = Endpoint("events", "POST", "default", "/v3/events", max_bytes=60 * 1024)
CONTACTS = Endpoint("contacts", "POST", "default", "/v3/contacts")

NAME_MAX = 255
# "General rate limits" (https://developers.brevo.com/docs/api-limits): POST /v3/events 10 RPS
# (36,000 RPH), /v3/contacts/{...} 10 RPS (36,000 RPH), on every account type.
DOCUMENTED_REQUESTS_PER_SECOND = 10.0
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")

# "Event Mapping" in docs/MAPPINGS.md#brevo (Amplitude event -> Brevo event); other names are slugged.
DEFAULT_EVENT_MAP = {
    "Purchase": "order_completed",
    "Sign Up": "customer_created",
    "Add to Cart": "cart_updated",
    "Page View": "page_viewed",
    "Feature Click": "feature_used",
    "Revenue": "revenue_event",
    "Subscription Started": "subscription_created",
}

# "User Property Mapping" in docs/MAPPINGS.md#brevo, keyed by Segment's reserved trait names where
# one exists (firstName, lastName, phone) and by the document's own names otherwise. `email` is not an attribute:
# it is the contact's identifier (`email` / `identifiers.email_id`).
DEFAULT_ATTRIBUTE_MAP = {
    "firstName": "FIRSTNAME",
    "first_name": "FIRSTNAME",
    "lastName": "LASTNAME",
    "last_name": "LASTNAME",
    "phone": "SMS",
    "plan_type": "PLAN",
    "signup_date": "SIGNUP_DATE",
    "total_purchases": "ORDER_COUNT",
    "lifetime_revenue": "LTV",
    "last_active": "LAST_ACTIVE",
    "device_type": "DEVICE",
}


class BrevoConfig(Section):
    env_prefix: ClassVar[str] = "BREVO_"

    api_key: SecretStr | None = None
    base_url: str = "https://api.brevo.com"
    # Segment trait -> Brevo contact attribute (JSON in BREVO_ATTRIBUTE_MAP replaces the default).
    attribute_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ATTRIBUTE_MAP))
    # Lists every identified contact is added to: BREVO_LIST_IDS="10,11" or "[10, 11]".
    list_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    # Segment event name -> Brevo event name (JSON in BREVO_EVENT_MAP replaces the default).
    event_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_EVENT_MAP))
    # Requests per second the sink keeps under (one item a request): Brevo's documented general-tier
    # limit, 10 RPS for POST /v3/events and for /v3/contacts (https://developers.brevo.com/docs/api-limits).
    events_per_second: float = Field(default=DOCUMENTED_REQUESTS_PER_SECOND, gt=0)

    @field_validator("list_ids", mode="before")
    @classmethod
    def _parse_list_ids(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


class Brevo:
    """The Brevo destination: track/page/screen -> event, identify -> contact upsert."""

    name = "brevo"

    def __init__(self, config: BrevoConfig) -> None:
        self.config = config
        self.endpoints: Mapping[str, Endpoint] = {e.name: e for e in (EVENTS, CONTACTS)}
        self.base_urls: Mapping[str, str] = {"default": config.base_url}
        # Kept under client-side (429s, which carry x-sib-ratelimit-reset, are still retried).
        self.events_per_second: float | None = config.events_per_second

    def map_event(self, event: SegmentEvent) -> list[Item]:
        kind = event.get("type")
        if kind == "identify":
            return [self._item(CONTACTS, self.contact_payload(event), event)]
        if kind in ("track", "page", "screen"):
            return [self._item(EVENTS, self.event_payload(event), event)]
        raise Skip(f"brevo has no {kind} call")

    def encode(self, endpoint: Endpoint, items: Sequence[Item]) -> Request:
        key = self.config.api_key
        return one_item_request(self.name, endpoint, items, {API_KEY_HEADER: key.get_secret_value()} if key else {})

    def classify(
        self, endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, headers: Mapping[str, str]
    ) -> Outcome:
        result = classify_status(status, body, headers)
        if status == 429 and result.retry_after is None:
            result = ItemResult(result.verdict, result.reason, _rate_limit_reset(headers))
        elif 400 <= status < 500 and result.verdict is Verdict.PERMANENT:
            result = _classify_client_error(endpoint, items, status, body, result)
        return Outcome(status, result)

    # -- payloads ---------------------------------------------------------------------------------

    def contact_payload(self, event: SegmentEvent) -> dict[str, Any]:
        traits = object_field(event, "traits")
        attributes = self._attributes(traits, "traits")
        email = _text(traits.get("email"))
        user_id = text_of(event.get("userId"))
        if not (email or user_id or attributes.get("SMS")):
            raise Skip("brevo contacts need an email, a userId (ext_id) or a phone (SMS)")
        payload: dict[str, Any] = {"updateEnabled": True}
        if email:
            payload["email"] = email
        if user_id:
            payload["ext_id"] = user_id
        if attributes:
            payload["attributes"] = attributes
        if self.config.list_ids:
            payload["listIds"] = list(self.config.list_ids)
        return payload

    def event_payload(self, event: SegmentEvent) -> dict[str, Any]:
        traits = as_object(object_field(event, "context").get("traits"))
        identifiers: dict[str, str] = {}
        if email := _text(traits.get("email")):
            identifiers["email_id"] = email
        if user_id := text_of(event.get("userId")):
            identifiers["ext_id"] = user_id
        contact_properties = self._attributes(traits, "context.traits")
        # A contact created from a phone alone (an identify with only `SMS`) is still that contact
        # here: Brevo's identifiers take the SMS number as `phone_id`.
        if phone := _phone(contact_properties.get("SMS")):
            identifiers["phone_id"] = phone
        if not identifiers:
            raise Skip("brevo events need a userId (ext_id), an email (email_id) or a phone (phone_id)")
        properties = dict(object_field(event, "properties"))
        if event.get("type") in ("page", "screen") and event.get("name"):
            properties.setdefault("name", event["name"])
        # Brevo has no event id: the messageId rides along as a property so duplicates can be seen.
        properties["messageId"] = event.get("messageId", "")
        payload: dict[str, Any] = {
            "event_name": self.event_name(event),
            "identifiers": identifiers,
            "event_properties": _clean_properties(properties),
        }
        if contact_properties:
            payload["contact_properties"] = contact_properties
        if timestamp := event.get("timestamp"):
            payload["event_date"] = timestamp
        return payload

    def event_name(self, event: SegmentEvent) -> str:
        kind = event.get("type")
        if kind == "page":
            raw = self.config.event_map.get("Page View", "page_viewed")
        elif kind == "screen":
            raw = self.config.event_map.get("Screen View", "screen_viewed")
        else:
            raw = event.get("event") or ""
            if not isinstance(raw, str):
                raise Unmappable(f"event must be a string, got {type(raw).__name__}")
            raw = self.config.event_map.get(raw, raw)
        name = slug(raw)
        if not name:
            raise Unmappable(f"event name {raw[:64]!r} leaves no valid Brevo event_name")
        return name

    def _attributes(self, traits: Mapping[str, Any], where: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        for trait, attribute in self.config.attribute_map.items():
            value = traits.get(trait)
            # Contact attributes take strings, numbers and booleans only; a number must be one the
            # API can store (finite, within 64 bits), not what orjson would write as null.
            if isinstance(value, str | int | float | bool) and value != "":
                attributes[attribute] = _attribute_number(value, f"{where}.{trait}")
        return attributes

    @staticmethod
    def _item(endpoint: Endpoint, payload: dict[str, Any], event: SegmentEvent) -> Item:
        user = text_of(event.get("userId") or event.get("anonymousId"))
        return encoded_item(endpoint.name, payload, text_of(event.get("messageId")), user)


def slug(name: str) -> str:
    """A name Brevo accepts: letters, digits, `-` and `_` only, at most 255 characters."""
    return _INVALID_NAME_CHARS.sub("_", name).strip("_").lower()[:NAME_MAX]


def _clean_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    """Event properties with valid keys (nested ones too) and without nulls, which Brevo rejects."""
    cleaned: dict[str, Any] = {}
    for key, value in properties.items():
        name = _INVALID_NAME_CHARS.sub("_", str(key)).strip("_")[:NAME_MAX]
        if not name or value is None:
            continue
        if isinstance(value, Mapping):
            value = _clean_properties(value)
        elif isinstance(value, list):
            value = [_clean_properties(v) if isinstance(v, Mapping) else v for v in value if v is not None]
        cleaned[name] = value
    return cleaned


def _classify_client_error(
    endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, default: ItemResult
) -> ItemResult:
    code, message = _error_body(body)
    if code is None:
        return default
    if (
        status == 400
        and code == "duplicate_parameter"
        and endpoint.name == CONTACTS.name
        and items
        and not items[0].payload.get("updateEnabled")
    ):
        # Without updateEnabled, "duplicate_parameter" means the contact already exists: the
        # create was a no-op, which is what we wanted. With updateEnabled (our mapping always sets
        # it) the same code means the email, ext_id or SMS belongs to another contact, a conflict
        # no retry can solve, so it stays permanent with Brevo's message as the reason.
        return ItemResult(Verdict.OK, f"contact already exists: {message}")
    return ItemResult(Verdict.PERMANENT, f"HTTP {status} {code}: {message}")


def _error_body(body: bytes) -> tuple[str | None, str]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, ""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("code"), str):
        return None, ""
    return parsed["code"], str(parsed.get("message", ""))


def _rate_limit_reset(headers: Mapping[str, str]) -> float | None:
    """Seconds until Brevo's rate-limit window resets (it sends no Retry-After); validated like Retry-After."""
    value = next((v for k, v in headers.items() if k.lower() == RATE_LIMIT_RESET_HEADER), None)
    return parse_seconds(value)


def _attribute_number(value: Any, what: str) -> Any:
    """A contact attribute as it is, unless it is a number the API cannot take: Unmappable then."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise Unmappable(f"{what} is out of the 64-bit integer range: {str(value)[:40]}")
        return value
    if not math.isfinite(value):
        raise Unmappable(f"{what} must be a finite number, got {value!r}")
    return value


def _phone(value: Any) -> str | None:
    """The SMS attribute as Brevo's `phone_id` (a string): text as it is, a whole number as its digits."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def make(config: BrevoConfig | None = None) -> Brevo:
    return Brevo(config or BrevoConfig())
