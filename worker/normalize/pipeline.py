"""One raw payload in, what should be written out: the normaliser's logic, with no Kafka in it.

Per event: validate and canonicalise; fix timestamps against receivedAt; fill messageId; link and
fill identities; run the enrichers; route; encode. The Kafka side (worker.normalize.strategy) writes
the result.

Containment: whatever goes wrong with one event (an invalid field, or any exception from any of
those steps) rejects that event alone, to be dead-lettered as `invalid`, and processing goes on.
One bad record must never stop the normaliser: the next group member would crash on it too. An
exception nobody expected has the reason "<ExceptionType>: <message>" and is logged with its
traceback, so the bug behind it can be found and fixed at its cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker import logs
from worker.avro_codec import EventCodec
from worker.normalize.identities import IdentityMap
from worker.normalize.routing import destinations_for
from worker.segment import envelope
from worker.segment.envelope import RejectedEvent
from worker.segment.event import SegmentEvent, partition_key
from worker.segment.ids import anonymous_id_for_user, derived_message_id
from worker.segment.timestamps import InvalidTimestamp, correct_skew, iso_from_millis, millis_and_text
from worker.segment.validate import MAX_ID_LENGTH, InvalidEvent, canonical

log = logs.get(__name__)

Enricher = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class RoutedEvent:
    key: str
    value: bytes  # Avro single-object encoded SegmentEvent
    destinations: list[str]
    event: SegmentEvent
    # What an event held for its userId (worker.normalize.stitching) needs to be encoded again.
    extra: dict[str, Any] = field(default_factory=dict)
    link: tuple[str, str] | None = None  # the anonymousId -> userId link this event teaches, new or not


class Result:
    """What one raw record produced. Built per record, so a plain slotted class (a dataclass with
    default factories costs twice as much to build)."""

    __slots__ = ("filtered", "links", "rejected", "routed")

    def __init__(self) -> None:
        self.routed: list[RoutedEvent] = []
        self.rejected: list[RejectedEvent] = []
        self.links: list[tuple[str, str]] = []  # new anonymousId -> userId links
        self.filtered: list[str] = []  # reasons, one per event deliberately dropped


class Normaliser:
    def __init__(
        self,
        destinations: list[str],
        identities: IdentityMap,
        enrichers: list[Enricher],
        codec: EventCodec | None = None,
    ) -> None:
        self.destinations = destinations
        self.identities = identities
        self.enrichers = enrichers
        self.codec = codec or EventCodec()

    def process(self, value: bytes | None, kafka_timestamp_ms: int, topic: str, partition: int, offset: int) -> Result:
        """Everything to write for the record at (topic, partition, offset). Never raises for any input."""
        result = Result()
        try:
            parsed = envelope.parse(value)
        except envelope.InvalidPayload as exc:
            result.rejected.append(RejectedEvent(None, value or b"", str(exc)))
            return result
        except Exception as exc:
            result.rejected.append(RejectedEvent(None, value or b"", _unexpected(exc, topic, partition, offset)))
            return result
        result.rejected.extend(parsed.rejected)
        for position, (raw, index) in enumerate(zip(parsed.events, parsed.indexes, strict=True)):
            # The per-event boundary: one event's failure is that event's dead letter, nothing more.
            try:
                self._one(raw, kafka_timestamp_ms, (topic, partition, offset, index), result)
                continue
            except (InvalidEvent, InvalidTimestamp) as exc:
                reason = str(exc)
            except Exception as exc:
                reason = _unexpected(exc, topic, partition, offset, index if parsed.is_batch else None)
            # A bad batch item is dead-lettered as itself (as the envelope serialised it).
            original = parsed.encoded[position] if parsed.is_batch else (value or b"")
            result.rejected.append(RejectedEvent(index if parsed.is_batch else None, original, reason))
        return result

    def _one(
        self,
        raw: dict[str, Any],
        received_default_ms: int,
        coordinates: tuple[str, int, int, int],
        result: Result,
    ) -> None:
        """One event, all or nothing: `result` (and the identity map) change only once it has fully
        succeeded, so a rejected event leaves no routed copy and no identity link behind."""
        message_id = None if raw.get("messageId") else derived_message_id(raw, *coordinates)  # before edits
        event, extra = canonical(raw)
        self._fix_timestamps(event, received_default_ms)
        if "messageId" not in event:
            event["messageId"] = message_id or derived_message_id(raw, *coordinates)
        link = self._fill_identity(event)
        for enrich in self.enrichers:
            enrich(event)  # type: ignore[arg-type]
        chosen = destinations_for(event["integrations"], self.destinations)
        routed = (
            RoutedEvent(partition_key(event), self.codec.encode(event, extra), chosen, event, extra, link)
            if chosen
            else None
        )
        if link is not None and self.identities.put(*link):
            result.links.append(link)
        if routed is None:
            result.filtered.append("no destination enabled by integrations")
        else:
            result.routed.append(routed)

    @staticmethod
    def _fix_timestamps(event: SegmentEvent, received_default_ms: int) -> None:
        """receivedAt (the event's own, else the record's Kafka timestamp), originalTimestamp as the
        client said, timestamp corrected for the client's clock skew. Integer milliseconds
        throughout: this runs for every event. The Kafka timestamp's text is made only for an event
        without receivedAt (what the collector stamps on every event it writes)."""
        if "receivedAt" in event:
            received_ms, event["receivedAt"] = millis_and_text(event["receivedAt"])
        else:
            try:
                event["receivedAt"] = iso_from_millis(received_default_ms)
            except InvalidTimestamp:  # a producer may set any CreateTime
                raise InvalidTimestamp(
                    f"no receivedAt, and the record's Kafka timestamp ({received_default_ms} ms) "
                    "is outside the years 0001-9999"
                ) from None
            received_ms = received_default_ms
        received_text = event["receivedAt"]
        sent_ms = None
        if "sentAt" in event:  # checked even when nothing uses it: it goes downstream as it is now
            sent_ms, event["sentAt"] = millis_and_text(event["sentAt"])
        given = event.get("originalTimestamp") or event.get("timestamp")
        if given is None:  # the client said nothing: it happened when it arrived
            event["originalTimestamp"] = event["timestamp"] = received_text
            return
        original_ms, event["originalTimestamp"] = millis_and_text(given)
        if sent_ms is None:
            event["timestamp"] = event["originalTimestamp"]
            return
        try:
            event["timestamp"] = iso_from_millis(correct_skew(original_ms, sent_ms, received_ms))
        except InvalidTimestamp:
            raise InvalidTimestamp(
                "timestamp corrected for clock skew, receivedAt - (sentAt - originalTimestamp), "
                "is outside the years 0001-9999"
            ) from None

    def _fill_identity(self, event: SegmentEvent) -> tuple[str, str] | None:
        """Fill userId from the identity map and anonymousId when absent; return the anonymousId ->
        userId link this event teaches (recorded by the caller once the event has succeeded)."""
        user_id = event.get("userId")
        anonymous_id = event.get("anonymousId")
        link = None
        if event["type"] == "alias":
            # alias ties previousId (an anonymousId or an old userId) to userId.
            link = (event["previousId"], event["userId"])
        elif user_id and anonymous_id:
            link = (anonymous_id, user_id)
        elif anonymous_id and not user_id:
            known = self.identities.get(anonymous_id)
            if known is not None:
                event["userId"] = known
        if not event.get("anonymousId"):
            device = event["context"].get("device")
            device_id = _device_id(device.get("id")) if isinstance(device, dict) else None
            event["anonymousId"] = device_id or anonymous_id_for_user(event["userId"])
        return link


def _device_id(value: object) -> str | None:
    """`context.device.id` as an anonymousId, when it is usable as one (a string or a number, no
    longer than any other id); anything else is ignored and the id derived from userId instead."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = value if isinstance(value, str) else str(int(value)) if float(value).is_integer() else str(value)
    return text if 0 < len(text) <= MAX_ID_LENGTH else None


def _unexpected(exc: Exception, topic: str, partition: int, offset: int, index: int | None = None) -> str:
    """The dead-letter reason of an exception the normaliser did not expect, logged with its traceback."""
    log.warning(
        "event failed unexpectedly; dead-lettered",
        error=repr(exc)[:500],
        topic=topic,
        partition=partition,
        offset=offset,
        batch_index=index,
        exc_info=exc,
    )
    # A header value must encode as UTF-8: an exception's text might carry lone surrogates.
    return f"{type(exc).__name__}: {exc}".encode("utf-8", "replace").decode("utf-8")
