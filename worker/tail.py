"""`segment-worker tail TOPIC`: print a topic's messages decoded, one JSON object a line."""

from __future__ import annotations

import base64
import sys
import time
import uuid
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Message, TopicPartition

from worker.avro_codec import MAGIC, EventCodec, UnknownSchema
from worker.dead_letters import header_map


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
    properties: dict[str, str],
    topic: str,
    from_beginning: bool,
    limit: int | None,
    idle_timeout: float | None,
    out: Any = None,
) -> int:
    """Print messages until `limit` are printed or nothing arrives for `idle_timeout` seconds."""
    out = out or sys.stdout.buffer
    consumer = Consumer(
        {
            **properties,
            "group.id": f"segment-tail-{uuid.uuid4()}",
            "enable.auto.commit": "false",
            "enable.partition.eof": "false",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise SystemExit(f"topic {topic!r} does not exist")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in metadata.topics[topic].partitions])
        codec, printed, last = EventCodec(), 0, time.monotonic()
        while limit is None or printed < limit:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    break
                continue
            out.write(render(message, codec) + b"\n")
            out.flush()
            printed += 1
            last = time.monotonic()
        return printed
    finally:
        consumer.close()
