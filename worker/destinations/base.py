"""The contract between a destination module and the shared sink runner.

A destination maps each normalised Segment event (worker.segment.event.SegmentEvent) to zero or
more `Item`s, each bound for one of its `Endpoint`s. The runner groups items by endpoint into
requests within the endpoint's limits, asks the destination to `encode` them, sends them, and asks
it to `classify` the response into one `ItemResult` per item. All of this is pure: no I/O, no
clock, no globals, so it is tested with golden examples.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import orjson

from worker.segment.event import SegmentEvent
from worker.segment.timestamps import InvalidTimestamp, millis_of


class Skip(Exception):
    """The event is deliberately not sent (e.g. Amberflo identify without userId); counted by reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unmappable(Exception):
    """The event cannot be mapped (missing a field the destination requires): dead-lettered as `invalid`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Endpoint:
    """One HTTP endpoint of a destination and how many items one request may carry."""

    name: str  # e.g. "events", "customers"
    method: str  # "POST" | "PUT"
    base: str  # which base URL: "default", or "mobile" for Reteno's device endpoint
    path: str  # e.g. "/2/httpapi"
    max_items: int = 1  # 1 means one item per request (the body is the item itself)
    max_bytes: int = 1_000_000


class Item:
    """One unit the destination accepts: an Amplitude event, an Amberflo meter record, a contact...

    A mapped item (`encoded_item`) keeps only its JSON bytes, not the payload's dict: a sink holds
    up to SINK_MAX_BUFFERED_EVENTS + SINK_MAX_HELD_EVENTS items through an outage, and the dict (a
    few dozen Python objects, ~5 KB for an Amplitude event) is four times its bytes. `payload` is read
    back from the bytes on the rare paths that look inside a sent item (a 400 or 429 that names
    users or devices) and in tests. An item built with a payload and no body (a test's hand-made
    item) keeps the payload, and `encode` serialises it then.
    """

    __slots__ = ("_payload", "body", "dedupe_id", "endpoint", "user")

    def __init__(
        self,
        endpoint: str,  # Endpoint.name
        payload: dict[str, Any] | None,
        dedupe_id: str,  # the destination's dedupe key, from the messageId (insert_id / uniqueId / keyValue)
        user: str = "",  # who it is about (for per-user order and throttling): user id, else device id
        body: bytes | None = None,  # the payload as JSON, when it was encoded at mapping time
    ) -> None:
        if payload is None and body is None:
            raise ValueError("an Item needs its payload or its body")
        self.endpoint = endpoint
        self._payload = payload if body is None else None
        self.dedupe_id = dedupe_id
        self.user = user
        self.body = body

    @property
    def payload(self) -> dict[str, Any]:
        if self._payload is not None:
            return self._payload
        assert self.body is not None
        return orjson.loads(self.body)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Item:
            return NotImplemented
        assert isinstance(other, Item)
        return (self.endpoint, self.dedupe_id, self.user, self.payload) == (
            other.endpoint,
            other.dedupe_id,
            other.user,
            other.payload,
        )

    __hash__ = None  # type: ignore[assignment]  # equal by payload, a dict

    def __repr__(self) -> str:
        return f"Item({self.endpoint!r}, {self.payload!r}, {self.dedupe_id!r}, {self.user!r})"


def encoded_item(endpoint: str, payload: dict[str, Any], dedupe_id: str, user: str = "") -> Item:
    """An Item whose payload is known to encode; raises Unmappable (with the reason) when it does not.
    The item keeps the bytes and lets go of the dict."""
    return Item(endpoint, None, dedupe_id, user, json_bytes(payload))


def item_json(item: Item) -> Any:
    """What to put in a request body for `item`: its pre-encoded bytes (as an orjson Fragment), else its payload."""
    return orjson.Fragment(item.body) if item.body is not None else item.payload


def json_bytes(payload: Any) -> bytes:
    """orjson's bytes for `payload`, or Unmappable: integers beyond 64 bits, strings that are not valid
    UTF-8 (lone surrogates), keys that are not strings and nesting deeper than 254 cannot be encoded."""
    try:
        encoded = orjson.dumps(payload)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise Unmappable(f"the payload cannot be encoded as JSON: {exc}") from None
    return right_sized(encoded)


def right_sized(encoded: bytes) -> bytes:
    """A copy of `encoded` that holds only its bytes. orjson returns its working buffer, rounded up
    and never shrunk: a 1.3 KB Amplitude event keeps an 8-16 KB allocation (measured with
    tracemalloc; `sys.getsizeof` shows only the length), ten times what it holds. Fine for a request
    body sent at once, not for an item a sink holds through an outage. A two-part join always copies
    (bytes(b) and b[:] return b itself) and costs ~0.15 us."""
    return b"".join((encoded, b""))


# -- coercion of event values (pure) -------------------------------------------------------------
#
# The normaliser guarantees the shape of an event (worker.segment.event) but not what producers put
# inside its free-form maps. These helpers turn a value into what a destination field needs, or
# raise Unmappable with a reason a person can act on, so no value can crash a mapping.

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def object_field(event: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A top-level map of the event (`properties`, `traits`, `context`): {} when absent; Unmappable when
    it is not an object (the normaliser always writes objects there)."""
    value = event.get(name)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    raise Unmappable(f"{name} must be an object, got {type(value).__name__}")


def as_object(value: Any) -> dict[str, Any]:
    """A nested map (`context.traits`, `context.device` ...): the value if it is an object, else {}."""
    return value if isinstance(value, dict) else {}


# Browser evidence: Segment's rule (library analytics.js -> platform "Web"), RudderStack's (channel
# "web"), and a browser user agent, which is what any collector in front of a browser passes on.
BROWSER_LIBRARIES = frozenset({"analytics.js", "analytics-next"})
BROWSER_CHANNELS = frozenset({"web", "browser"})


def is_browser_event(context: Mapping[str, Any], channel: Any) -> bool:
    """The event came from a browser (not an app): the library, the channel or the user agent says
    so (docs/MAPPINGS.md#amplitude). The UA enricher's device.type (desktop/mobile/tablet) is a form
    factor and says nothing about it."""
    library = as_object(context.get("library")).get("name")
    user_agent = context.get("userAgent")
    return (
        (isinstance(library, str) and library in BROWSER_LIBRARIES)
        or (isinstance(channel, str) and channel.lower() in BROWSER_CHANNELS)
        or (isinstance(user_agent, str) and user_agent.startswith("Mozilla/"))
    )


def text_of(value: Any) -> str:
    """A name or id as text: strings as they are, anything else in its JSON spelling where it has one."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def finite_number(value: Any, what: str) -> float | None:
    """A number (or numeric string) as a finite float; None when absent or not numeric at all (a
    boolean, a word, an object); Unmappable when numeric but not finite (nan, inf, "1e999") or too
    large for a double."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    try:
        number = float(number)
    except OverflowError:
        raise Unmappable(f"{what} is too large for a number: {_preview(value)}") from None
    if not math.isfinite(number):
        raise Unmappable(f"{what} must be a finite number, got {_preview(value)}")
    return number


def int64(value: Any, what: str) -> int | None:
    """`finite_number` truncated to an integer within the signed 64-bit range, else Unmappable."""
    if isinstance(value, int) and not isinstance(value, bool):
        number: float | int | None = value  # exact: no round trip through float
    else:
        number = finite_number(value, what)
        if number is None:
            return None
    if not INT64_MIN <= number <= INT64_MAX:
        raise Unmappable(f"{what} is out of the 64-bit integer range: {_preview(value)}")
    return int(number)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Request:
    method: str
    base: str
    path: str
    headers: Mapping[str, str]
    body: bytes


class Verdict(StrEnum):
    OK = "ok"  # delivered
    RESEND = "resend"  # not accepted through no fault of its own (a batch-mate was bad): send again now
    RETRY = "retry"  # transient failure: back off, counts against the retry budget
    THROTTLED = "throttled"  # this item's user is throttled: hold back only that user
    PERMANENT = "permanent"  # the destination will never accept it: dead letter
    SPLIT = "split"  # too large (413), or rejected without saying which item: halve it and resend


@dataclass(frozen=True)
class ItemResult:
    verdict: Verdict
    reason: str = ""
    retry_after: float | None = None  # seconds, from Retry-After or the API's own hint


@dataclass(frozen=True)
class Outcome:
    """The classification of one response: a default for every item, with per-item exceptions."""

    http_status: int | None
    default: ItemResult
    per_item: Mapping[int, ItemResult] = field(default_factory=dict)

    def for_item(self, index: int) -> ItemResult:
        return self.per_item.get(index, self.default)


class Destination(Protocol):
    name: str
    endpoints: Mapping[str, Endpoint]
    base_urls: Mapping[str, str]  # Endpoint.base -> URL
    events_per_second: float | None  # the rate the runner keeps under; None for no limit

    def map_event(self, event: SegmentEvent) -> list[Item]:
        """Items for one event; raises Skip or Unmappable."""
        ...

    def encode(self, endpoint: Endpoint, items: Sequence[Item]) -> Request: ...

    def classify(
        self, endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, headers: Mapping[str, str]
    ) -> Outcome: ...


def one_item_request(destination: str, endpoint: Endpoint, items: Sequence[Item], auth: Mapping[str, str]) -> Request:
    """The request for an endpoint that takes one JSON object a call (Reteno, Brevo)."""
    if len(items) != 1:
        raise ValueError(f"{destination} {endpoint.name} takes one item per request, got {len(items)}")
    headers = {"Content-Type": "application/json", "Accept": "application/json", **auth}
    item = items[0]
    body = item.body if item.body is not None else orjson.dumps(item.payload)
    return Request(endpoint.method, endpoint.base, endpoint.path, headers, body)


# The longest wait a hint can ask for: `inf`, `1e309` and year-9999 dates come out as this. The
# delivery engine caps every hint again at SINK_BACKOFF_MAX and the item's remaining retry budget.
MAX_HINT_SECONDS = 86_400.0


def parse_seconds(value: object) -> float | None:
    """A wait in seconds from a header or body value: a finite, non-negative number at most
    MAX_HINT_SECONDS; None when absent, not a number, negative or nan (not a usable hint)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if not seconds >= 0.0:  # negative, or nan
        return None
    return min(seconds, MAX_HINT_SECONDS)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3), validated by
    `parse_seconds` (a date in the past means now: 0)."""
    if not value:
        return None
    value = value.strip()
    seconds = parse_seconds(value)
    if seconds is not None:
        return seconds
    try:
        float(value)
    except (ValueError, OverflowError):
        pass
    else:
        return None  # a number, but negative or nan
    try:
        when = email.utils.parsedate_to_datetime(value)
        delta = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return parse_seconds(max(0.0, delta))


def classify_status(status: int, body: bytes, headers: Mapping[str, str]) -> ItemResult:
    """The common HTTP rule: 2xx ok; 401/403/408/429/5xx retry (honouring Retry-After); 413 split;
    other 4xx permanent."""
    if 200 <= status < 300:
        return ItemResult(Verdict.OK)
    reason = f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
    if status in (401, 403):
        # A rejected key is the deployment's fault, not the events': back off (the sink pauses its
        # partitions) until the key is fixed, instead of dead-lettering everything; a key that stays
        # wrong still ends in the DLQ as `exhausted` once the retry budget is spent.
        return ItemResult(Verdict.RETRY, f"{reason} (credentials rejected: check the API key)")
    if status in (408, 429) or status >= 500:
        return ItemResult(Verdict.RETRY, reason, parse_retry_after(_header(headers, "Retry-After")))
    if status == 413:
        return ItemResult(Verdict.SPLIT, reason)
    return ItemResult(Verdict.PERMANENT, reason)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        for key, candidate in headers.items():
            if key.lower() == lowered:
                return candidate
    return value


def event_millis(event: SegmentEvent) -> int:
    """The event's `timestamp` in epoch milliseconds, or Unmappable saying why not."""
    try:
        return millis_of(event.get("timestamp", ""))
    except InvalidTimestamp as exc:
        raise Unmappable(f"timestamp: {exc}") from None
    except (ValueError, OverflowError, TypeError) as exc:  # a date outside what datetime can represent
        raise Unmappable(f"timestamp: {type(exc).__name__}: {exc}") from None
