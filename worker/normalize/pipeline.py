"""One raw payload in, what should be written out: the normaliser's logic, with no Kafka in it.

Per event: validate and canonicalise; fix timestamps against receivedAt; fill messageId; link and
fill identities; run the enrichers; route. The Kafka side (worker.normalize.strategy) writes the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.avro_codec import EventCodec
from worker.normalize.identities import IdentityMap
from worker.normalize.routing import destinations_for
from worker.segment import envelope
from worker.segment.envelope import RejectedEvent
from worker.segment.event import SegmentEvent, partition_key
from worker.segment.ids import anonymous_id_for_user, deterministic_message_id
from worker.segment.timestamps import InvalidTimestamp, canonical_text, correct_skew, iso_from_millis, millis_of
from worker.segment.validate import InvalidEvent, canonical

Enricher = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class RoutedEvent:
    key: str
    value: bytes  # Avro single-object encoded SegmentEvent
    destinations: list[str]
    event: SegmentEvent


@dataclass(slots=True)
class Result:
    routed: list[RoutedEvent] = field(default_factory=list)
    rejected: list[RejectedEvent] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # new anonymousId -> userId links
    filtered: list[str] = field(default_factory=list)  # reasons, one per event deliberately dropped


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

    def process(self, value: bytes | None, kafka_timestamp_ms: int) -> Result:
        result = Result()
        try:
            parsed = envelope.parse(value)
        except envelope.InvalidPayload as exc:
            result.rejected.append(RejectedEvent(None, value or b"", str(exc)))
            return result
        result.rejected.extend(parsed.rejected)
        received_default_text = iso_from_millis(kafka_timestamp_ms)
        for position, (raw, index) in enumerate(zip(parsed.events, parsed.indexes, strict=True)):
            # A bad batch item is dead-lettered as itself (as the envelope serialised it).
            original = parsed.encoded[position] if parsed.is_batch else (value or b"")
            try:
                self._one(raw, kafka_timestamp_ms, received_default_text, result)
            except (InvalidEvent, InvalidTimestamp) as exc:
                result.rejected.append(RejectedEvent(index if parsed.is_batch else None, original, str(exc)))
        return result

    def _one(self, raw: dict[str, Any], received_default_ms: int, received_default_text: str, result: Result) -> None:
        message_id = None if raw.get("messageId") else deterministic_message_id(raw)  # before edits
        event, extra = canonical(raw)
        self._fix_timestamps(event, received_default_ms, received_default_text)
        if "messageId" not in event:
            event["messageId"] = message_id or deterministic_message_id(raw)
        self._fill_identity(event, result)
        for enrich in self.enrichers:
            enrich(event)  # type: ignore[arg-type]
        chosen = destinations_for(event["integrations"], self.destinations)
        if not chosen:
            result.filtered.append("no destination enabled by integrations")
            return
        result.routed.append(RoutedEvent(partition_key(event), self.codec.encode(event, extra), chosen, event))

    @staticmethod
    def _fix_timestamps(event: SegmentEvent, received_default_ms: int, received_default_text: str) -> None:
        """receivedAt (the event's own, else the Kafka timestamp), originalTimestamp as the client
        said, timestamp corrected for the client's clock skew. Integer milliseconds throughout:
        this runs for every event."""
        if "receivedAt" in event:
            received_ms = millis_of(event["receivedAt"])
            event["receivedAt"] = received_text = canonical_text(event["receivedAt"], received_ms)
        else:
            received_ms = received_default_ms
            event["receivedAt"] = received_text = received_default_text
        given = event.get("originalTimestamp") or event.get("timestamp")
        if given is None:  # the client said nothing: it happened when it arrived
            event["originalTimestamp"] = event["timestamp"] = received_text
            return
        original_ms = millis_of(given)
        event["originalTimestamp"] = original_text = canonical_text(given, original_ms)
        if "sentAt" in event:
            sent_ms = millis_of(event["sentAt"])
            event["sentAt"] = canonical_text(event["sentAt"], sent_ms)
            event["timestamp"] = iso_from_millis(correct_skew(original_ms, sent_ms, received_ms))
        else:
            event["timestamp"] = original_text

    def _fill_identity(self, event: SegmentEvent, result: Result) -> None:
        user_id = event.get("userId")
        anonymous_id = event.get("anonymousId")
        if event["type"] == "alias":
            # alias ties previousId (an anonymousId or an old userId) to userId.
            if self.identities.put(event["previousId"], event["userId"]):
                result.links.append((event["previousId"], event["userId"]))
        elif user_id and anonymous_id:
            if self.identities.put(anonymous_id, user_id):
                result.links.append((anonymous_id, user_id))
        elif anonymous_id and not user_id:
            known = self.identities.get(anonymous_id)
            if known is not None:
                event["userId"] = known
        if not event.get("anonymousId"):
            device_id = (
                event["context"].get("device", {}).get("id")
                if isinstance(event["context"].get("device"), dict)
                else None
            )
            event["anonymousId"] = str(device_id) if device_id else anonymous_id_for_user(event["userId"])
