"""`segment-worker tail TOPIC`: print a topic's messages decoded, one JSON object a line."""

from __future__ import annotations

import base64
import sys
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Message

from worker.avro_codec import MAGIC, EventCodec, UnknownSchema
from worker.dlq.headers import header_map
from worker.kafka.clients import KafkaClients
from worker.kafka.reading import TopicMissing, assign_all, read_until_quiet


def decode_value(value: bytes | None, codec: EventCodec) -> Any:
    """Avro single-object records decoded; JSON as JSON; anything else base64, so nothing is hidden."""
    if value is None:
        return None
    if value[:2] == MAGIC:
        try:
            event, extra = codec.decode(value)
            return {**event, **({"extra": extra} if extra else {})}
        except (UnknownSchema, ValueError, IndexError):
            pass
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return {"base64": base64.b64encode(value).decode()}


def render(message: Message, codec: EventCodec) -> bytes:
    key = message.key()
    record = {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": message.timestamp()[1],
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "headers": header_map(message.headers()),
        "value": decode_value(message.value(), codec),
    }
    return orjson.dumps(record)


def tail(
    clients: KafkaClients,
    topic: str,
    from_beginning: bool,
    limit: int | None,
    idle_timeout: float | None,
    out: Any = None,
) -> int:
    """Print messages until `limit` are printed or nothing arrives for `idle_timeout` seconds."""
    out = out or sys.stdout.buffer
    consumer = clients.reader("tail")
    try:
        try:
            assign_all(consumer, [topic], OFFSET_BEGINNING if from_beginning else OFFSET_END)
        except TopicMissing:
            raise SystemExit(f"topic {topic!r} does not exist") from None
        codec, printed = EventCodec(), 0
        for message in read_until_quiet(consumer, idle_timeout, grace=0.0, batch=1):
            if limit is not None and printed >= limit:
                break
            out.write(render(message, codec) + b"\n")
            out.flush()
            printed += 1
            if limit is not None and printed >= limit:
                break
        return printed
    finally:
        consumer.close()
