"""The contract between a destination module and the shared sink runner.

A destination maps each normalised Segment event (worker.segment.event.SegmentEvent) to zero or
more `Item`s, each bound for one of its `Endpoint`s. The runner groups items by endpoint into
requests within the endpoint's limits, asks the destination to `encode` them, sends them, and asks
it to `classify` the response into one `ItemResult` per item. All of this is pure: no I/O, no
clock, no globals, so it is tested with golden examples.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import orjson

from worker.segment.event import SegmentEvent


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


@dataclass(frozen=True)
class Item:
    """One unit the destination accepts: an Amplitude event, an Amberflo meter record, a contact..."""

    endpoint: str  # Endpoint.name
    payload: dict[str, Any]
    dedupe_id: str  # the destination's dedupe key, derived from the messageId (insert_id / uniqueId / keyValue)
    user: str = ""  # who it is about (for per-user throttling): user id, else device id


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
    return Request(endpoint.method, endpoint.base, endpoint.path, headers, orjson.dumps(items[0].payload))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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
