"""Amberflo: page/screen/track -> meter records (`POST /ingest`), identify -> customer (`PUT /customers`).

The mapping follows Segment's Amberflo destination (docs/MAPPINGS.md#amberflo, from
https://segment.com/catalog/integrations/amberflo/) field for field:

| Segment | meter record |
| --- | --- |
| messageId | uniqueId |
| userId, else anonymousId | customerId |
| track `event` / "page" / "screen" | meterApiName |
| timestamp | meterTimeInMillis |
| track: properties.value, else 1; page/screen: 1 | meterValue |
| properties (track: without `value`); page/screen `name` as dimensions.name | dimensions |

identify (skipped without userId, as the document says): userId -> customerId, traits.name ->
customerName, traits.email -> customerEmail, the other traits -> traits.

Every example payload in the document shows dimension and trait values with `/` and `|` replaced by `_`
("https://google.com" -> "https:__google.com", "Welcome | Initech" -> "Welcome _ Initech"); we do
the same so our records match what Amberflo's own Segment integration sends.

Where the document and Amberflo's API reference disagree, the reference wins:
- dimensions and customer traits are `dictionary<string,string>`
  (https://docs.amberflo.io/docs/create-customers2, https://docs.amberflo.io/reference/post_ingest and
  the official SDK's `require_string_dictionary`, github.com/amberflo/metering-python
  metering/ingest/api_client.py), so the document's `"logins": 5` trait is sent as `"5"`;
- `customerName` is required by the API; an identify without traits.name uses the userId as name.

Batching: the official Python SDK sends ingest batches of 100 records (metering-python
metering/ingest/consumer.py, `batch_size=100`), so one request carries at most 100 records. The
customer endpoint takes one customer per request (the body is the customer itself).
Note: the official SDKs post meters to https://ingest.amberflo.io/ingest; app.amberflo.io/ingest (the
document's URL and our default AMBERFLO_BASE_URL) is the older host for the same API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from pydantic import SecretStr

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
    classify_status,
    encoded_item,
    event_millis,
    finite_number,
    item_json,
    object_field,
    text_of,
)
from worker.segment.event import SegmentEvent

INGEST_ENDPOINT = "ingest"
CUSTOMERS_ENDPOINT = "customers"
MAX_RECORDS_PER_INGEST = 100

# What Amberflo's Segment integration replaces in dimension/trait values (see the module docstring).
_VALUE_SANITISER = str.maketrans({"/": "_", "|": "_"})


class AmberfloConfig(Section):
    env_prefix: ClassVar[str] = "AMBERFLO_"

    api_key: SecretStr | None = None
    base_url: str = "https://app.amberflo.io"


class AmberfloDestination:
    name = "amberflo"

    def __init__(self, config: AmberfloConfig) -> None:
        self.config = config
        self.base_urls: Mapping[str, str] = {"default": config.base_url}
        self.events_per_second: float | None = None  # no documented rate limit; 429s are retried
        self.endpoints: Mapping[str, Endpoint] = {
            INGEST_ENDPOINT: Endpoint(
                name=INGEST_ENDPOINT,
                method="POST",
                base="default",
                path="/ingest",
                max_items=MAX_RECORDS_PER_INGEST,
            ),
            CUSTOMERS_ENDPOINT: Endpoint(
                name=CUSTOMERS_ENDPOINT, method="PUT", base="default", path="/customers", max_items=1
            ),
        }

    def map_event(self, event: SegmentEvent) -> list[Item]:
        kind = event.get("type")
        if kind == "track":
            return [_meter_item(_track_record(event))]
        if kind in ("page", "screen"):
            return [_meter_item(_view_record(event, kind))]
        if kind == "identify":
            return [_customer_item(event)]
        raise Skip(f"{kind}: Amberflo has no {kind} call")

    def encode(self, endpoint: Endpoint, items: Sequence[Item]) -> Request:
        if endpoint.name == INGEST_ENDPOINT:
            body = orjson.dumps([item_json(item) for item in items])  # /ingest takes an array of records
        else:
            if len(items) != 1:
                raise ValueError(f"{endpoint.name} takes one item per request, got {len(items)}")
            body = orjson.dumps(item_json(items[0]))
        return Request(
            method=endpoint.method,
            base=endpoint.base,
            path=endpoint.path,
            headers={"Content-Type": "application/json", "Accept": "application/json", "X-API-KEY": self._key()},
            body=body,
        )

    def _key(self) -> str:
        key = self.config.api_key
        return key.get_secret_value() if key is not None else ""

    def classify(
        self, endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, headers: Mapping[str, str]
    ) -> Outcome:
        result = classify_status(status, body, headers)
        if result.verdict is Verdict.PERMANENT and len(items) > 1:
            # Amberflo's 4xx does not say which record was bad: halve the batch until the bad record
            # is alone, so its batch-mates are still delivered.
            return Outcome(status, ItemResult(Verdict.SPLIT, result.reason))
        return Outcome(status, result)


def make(config: AmberfloConfig | None = None) -> AmberfloDestination:
    return AmberfloDestination(config if config is not None else AmberfloConfig())


# -- mapping (pure) ----------------------------------------------------------------------------


def _track_record(event: SegmentEvent) -> dict[str, Any]:
    name = event.get("event")
    if not name:
        raise Unmappable("track without an event name")
    if not isinstance(name, str):
        raise Unmappable(f"event must be a string, got {type(name).__name__}")
    properties = dict(object_field(event, "properties"))
    value = properties.pop("value", None)
    return _record(event, name, _meter_value(value), _dimensions(properties))


def _view_record(event: SegmentEvent, kind: str) -> dict[str, Any]:
    """page/screen: a meter named "page"/"screen" with value 1; the view's name is a dimension."""
    dimensions: dict[str, str] = {}
    if event.get("name"):
        dimensions["name"] = _dimension_value(event["name"])
    for key, value in _dimensions(object_field(event, "properties")).items():
        dimensions.setdefault(key, value)
    return _record(event, kind, 1.0, dimensions)


def _record(event: SegmentEvent, meter: str, value: float, dimensions: dict[str, str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "uniqueId": _message_id(event),
        "customerId": _customer_id(event),
        "meterApiName": meter,
        "meterValue": value,
        "meterTimeInMillis": event_millis(event),
    }
    if dimensions:
        record["dimensions"] = dimensions
    return record


def _customer_payload(event: SegmentEvent) -> dict[str, Any]:
    user_id = event.get("userId")
    if not user_id:
        raise Skip("identify without userId")
    user_id = text_of(user_id)
    traits = dict(object_field(event, "traits"))
    name = traits.pop("name", None)
    email = traits.pop("email", None)
    payload: dict[str, Any] = {"customerId": user_id, "customerName": text_of(name) if name else user_id}
    if email:
        payload["customerEmail"] = text_of(email)
    payload["traits"] = _dimensions(traits)
    return payload


def _meter_item(record: dict[str, Any]) -> Item:
    return encoded_item(INGEST_ENDPOINT, record, str(record["uniqueId"]), record["customerId"])


def _customer_item(event: SegmentEvent) -> Item:
    payload = _customer_payload(event)
    return encoded_item(CUSTOMERS_ENDPOINT, payload, _message_id(event), payload["customerId"])


def _message_id(event: SegmentEvent) -> str:
    """The uniqueId Amberflo dedupes by; the normaliser always fills messageId, so absence is a bug."""
    message_id = event.get("messageId")
    if not message_id:
        raise Unmappable("missing messageId (the uniqueId)")
    return text_of(message_id)


def _customer_id(event: SegmentEvent) -> str:
    customer_id = event.get("userId") or event.get("anonymousId")
    if not customer_id:
        raise Unmappable("neither userId nor anonymousId")
    return text_of(customer_id)


def _meter_value(value: object) -> float:
    """properties.value, or 1 when it is not set; a value that is not a finite number is a bad event
    (orjson would send nan and inf as null, which the API refuses)."""
    if value is None:
        return 1.0
    if isinstance(value, bool):
        raise Unmappable("properties.value must be a number, got a boolean")
    number = finite_number(value, "properties.value")
    if number is None:
        raise Unmappable(f"properties.value must be a number, got {str(value)[:40]!r}")
    return number


def _dimensions(properties: Mapping[str, Any]) -> dict[str, str]:
    """String-to-string map (the API's type); null values carry no dimension and are left out."""
    return {str(key): _dimension_value(value) for key, value in properties.items() if value is not None}


def _dimension_value(value: object) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float | dict | list):
        # JSON spelling, so true stays "true" and nested objects stay readable.
        try:
            text = orjson.dumps(value).decode()
        except TypeError:  # an integer beyond 64 bits (possibly nested): its own digits
            text = str(value)
    else:
        text = str(value)
    return text.translate(_VALUE_SANITISER)
