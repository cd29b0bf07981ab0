"""The one dead-letter writer: the normaliser and every sink write dead letters through it.

A dead letter keeps the original value and key; its headers say what failed, why and where it came
from (worker.dlq.headers). Writing one also counts it (`segment_worker_dead_lettered_total`) and
logs one line; the caller learns of the broker's acknowledgement through `on_delivery`.

A dead letter too large to be produced as it is (a raw value near the broker's limit plus the
headers) is written truncated, with a `truncated` header giving the original size; the
`original_*` headers still point at the full message. It is never dropped.

`DLQ_MAX_CONSECUTIVE` (arroyo's DlqLimit, off by default): after that many dead letters in a row
with no success between them (`note_success`), `write` raises `DeadLetterLimitExceeded` instead of
writing, so the role stops with its input uncommitted.
"""

from __future__ import annotations

from confluent_kafka import Message

from worker import logs, metrics
from worker.dlq.headers import Kind, dead_letter_headers
from worker.dlq.settings import DlqSettings
from worker.kafka.producer import DeliveryCallback, Producer

log = logs.get(__name__)


# Headers of the failed message that a dead letter keeps: a letter that fails again after a replay
# still says which replay re-produced it, so that replay does not read it back for ever.
TRACE_HEADERS = ("replayed_from", "replay_run")
# Room for the record's own framing (lengths, timestamp, header names) beyond key, value and headers.
_RECORD_OVERHEAD_BYTES = 512


class DeadLetterLimitExceeded(RuntimeError):
    """Too many dead letters in a row: the role stops rather than dead-letter everything."""


class DeadLetterWriter:
    def __init__(self, producer: Producer, topic: str, destination: str, settings: DlqSettings | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.destination = destination  # a destination's name, or "raw" for the normaliser's rejects
        self.settings = settings or DlqSettings()
        self._counters = {kind: metrics.DEAD_LETTERED.labels(destination, str(kind)) for kind in Kind}
        self._in_a_row = 0

    def note_success(self) -> None:
        """Something was processed without a dead letter: the consecutive count starts again."""
        self._in_a_row = 0

    def write(
        self,
        original: Message,
        kind: Kind,
        reason: str,
        *,
        value: bytes | None = None,
        attempts: int = 1,
        http_status: int | None = None,
        extra: dict[str, str] | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Queue the dead letter of `original` (or of `value`, one part of it, e.g. a batch's event)."""
        limit = self.settings.max_consecutive
        if limit and self._in_a_row >= limit:
            raise DeadLetterLimitExceeded(
                f"{self._in_a_row} dead letters in a row for {self.destination} (DLQ_MAX_CONSECUTIVE={limit}); "
                f"stopping with the input uncommitted. The latest: {reason[:200]}"
            )
        self._in_a_row += 1
        headers = dead_letter_headers(
            error=reason,
            kind=kind,
            original_topic=original.topic(),
            original_partition=original.partition(),
            original_offset=original.offset(),
            destination=self.destination,
            attempts=max(attempts, 1),
            http_status=http_status,
            extra={**_trace_of(original), **(extra or {})},
        )
        payload = original.value() if value is None else value
        key = original.key()
        payload, headers = self._fitted(payload, key, headers)
        self.producer.produce(self.topic, payload, key, on_delivery, headers)
        self._counters[kind].inc()
        log.info(
            "dead-lettered",
            destination=self.destination,
            kind=str(kind),
            reason=reason,
            http_status=http_status,
            topic=original.topic(),
            partition=original.partition(),
            offset=original.offset(),
            attempts=attempts,
            **(extra or {}),
        )

    def _fitted(
        self, payload: bytes | None, key: bytes | str | None, headers: list[tuple[str, bytes]]
    ) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """The payload as it is, or cut to what fits under max_message_bytes with a `truncated` header."""
        if payload is None:
            return payload, headers
        framing = len(key.encode() if isinstance(key, str) else key or b"") + _RECORD_OVERHEAD_BYTES
        framing += sum(len(name) + len(value) for name, value in headers)
        limit = self.settings.max_message_bytes
        if framing + len(payload) <= limit:
            return payload, headers
        marker = ("truncated", str(len(payload)).encode())
        room = limit - framing - len(marker[0]) - len(marker[1])
        return payload[: max(room, 0)], [*headers, marker]


def _trace_of(original: Message) -> dict[str, str]:
    return {
        name: value.decode("utf-8", "replace")
        for name, value in original.headers() or []
        if name in TRACE_HEADERS and value is not None
    }
