"""A plain-loop Amplitude sink: what a competent engineer would write in an afternoon, as the peer the
product's `segment-worker sink amplitude` is measured against (bench/sink_throughput.py).

confluent-kafka consume(1000) from the dest topic -> strip Avro single-object encoding's 10-byte
header (marker and schema fingerprint checked) -> fastavro `schemaless_reader` with
schemas/segment_event.avsc -> orjson.loads of the JSON-string fields -> a plain mapping to an
Amplitude HTTP V2 event (user_id, device_id, event_type, time, insert_id, event_properties and the
context's ip, location, os, device, locale, library and platform) -> requests of up to 1000 events
and under 1 MB, JSON by orjson, POSTed one at a time over one keep-alive connection (urllib3) to
`/2/httpapi`. On a 2xx the request's offsets are stored; on 5xx, 429 or a connection error the
same request is sent again after a short sleep (bounded attempts, then it exits without storing);
offsets are committed asynchronously after every consumed batch. At-least-once, like the product.
It stops by itself once it has delivered `--events N`, or at `--deadline`, and commits on the way out.

What it leaves out, and the product does:
- requests in flight at once (SINK_CONCURRENCY) with each user's events still in order: this loop
  sends one request at a time, which keeps order by being serial;
- per-item verdicts and dead letters: a 400 names bad events, the product dead-letters only those
  and resends the rest; this loop drops the whole request (counted), as it drops records it cannot
  decode or map; no bisecting of a request the API refuses without naming the bad event, no
  halving on 413;
- Amplitude's `throttled_users` (only those users held back), Retry-After, backoff with jitter,
  a time budget, the circuit breaker that pauses instead of dead-lettering during an outage;
- the events-per-second rate limit, pausing partitions once too much is buffered (backpressure),
  metrics, health endpoints, a graceful SIGTERM, rebalances handled beyond librdkafka's defaults;
- most of the mapping: page/screen/identify/group (it maps every record as a track),
  user_properties (traits, campaign and referrer attribution), session_id, revenue fields,
  location_lat/lng, device_brand, idfa/idfv/adid, carrier, app_version, device_id from
  context.device.id, event and property renaming, `options.min_id_length`.

    .venv/bin/python bench/plain_sink.py BOOTSTRAP TOPIC BASE_URL API_KEY [--events N] [--group G]
        [--deadline SECONDS] [-X key=value ...]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import urllib3
from confluent_kafka import Consumer, TopicPartition
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "segment_event.avsc"
MAGIC = b"\xc3\x01"
JSON_FIELDS = ("properties", "traits", "context", "integrations", "extra")
MAX_EVENTS = 1000
MAX_BYTES = 1_000_000 - 10_000  # Amplitude answers 413 at 1 MB; room for the envelope
MAX_ATTEMPTS = 10
LINGER_SECONDS = 0.1  # a partial request waits this long for more records
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)
PLATFORMS = {"ios": "iOS", "android": "Android"}

# Amplitude field -> (context key, nested key or None): the paths the product's mapping reads.
CONTEXT_FIELDS = (
    ("ip", "ip", None),
    ("city", "location", "city"),
    ("country", "location", "country"),
    ("region", "location", "region"),
    ("os_name", "os", "name"),
    ("os_version", "os", "version"),
    ("device_model", "device", "model"),
    ("device_manufacturer", "device", "manufacturer"),
    ("language", "locale", None),
)

SCHEMA_JSON = json.loads(SCHEMA_PATH.read_text())
SCHEMA = parse_schema(SCHEMA_JSON)
# The single-object header: C3 01 and the schema's CRC-64-AVRO fingerprint, little-endian.
HEADER = MAGIC + bytes.fromhex(fingerprint(to_parsing_canonical_form(SCHEMA_JSON), "CRC-64-AVRO"))[::-1]


def decode(data: bytes) -> dict[str, Any]:
    if data[:10] != HEADER:
        raise ValueError("not single-object encoded with this schema")
    record: dict[str, Any] = schemaless_reader(io.BytesIO(data[10:]), SCHEMA, None)  # type: ignore[assignment]
    for name in JSON_FIELDS:
        record[name] = orjson.loads(record[name])
    return record


def to_amplitude(record: dict[str, Any]) -> dict[str, Any]:
    context = record["context"]
    event: dict[str, Any] = {
        "event_type": record["event"] or record["name"] or record["type"],
        "time": (datetime.fromisoformat(record["timestamp"]) - EPOCH) // MILLISECOND,
        "insert_id": record["messageId"],
        "event_properties": record["properties"],
    }
    if record["userId"]:
        event["user_id"] = record["userId"]
    if record["anonymousId"]:
        event["device_id"] = record["anonymousId"]
    for field, key, nested in CONTEXT_FIELDS:
        value = context.get(key)
        if nested is not None:
            value = value.get(nested) if isinstance(value, dict) else None
        if value is not None and value != "":
            event[field] = value
    library = context.get("library")
    if isinstance(library, dict) and library.get("name"):
        event["library"] = f"{library['name']}/{library['version']}" if library.get("version") else library["name"]
    device = context.get("device")
    device_type = device.get("type") if isinstance(device, dict) else None
    if isinstance(device_type, str) and device_type.lower() in PLATFORMS:
        event["platform"] = PLATFORMS[device_type.lower()]
    elif str(context.get("userAgent", "")).startswith("Mozilla/"):
        event["platform"] = "Web"
    return event


class Sender:
    """POSTs request bodies to /2/httpapi over one keep-alive connection, retrying what may succeed later."""

    def __init__(self, base_url: str, api_key: str) -> None:
        url = urlsplit(base_url)
        scheme = url.scheme or "http"
        pool = urllib3.HTTPSConnectionPool if scheme == "https" else urllib3.HTTPConnectionPool
        self.pool = pool(url.hostname, url.port, maxsize=1, block=True, timeout=urllib3.Timeout(10, 30))
        self.path = url.path.rstrip("/") + "/2/httpapi"
        self.prefix = b'{"api_key":' + orjson.dumps(api_key) + b',"events":['
        self.requests = self.retries = self.refused = 0

    def send(self, events: list[bytes]) -> bool:
        """True when the API took the request, False when it refused it (4xx other than 429)."""
        body = self.prefix + b",".join(events) + b"]}"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self.requests += 1
            try:
                response = self.pool.urlopen(
                    "POST",
                    self.path,
                    body=body,
                    headers={"Content-Type": "application/json"},
                    retries=False,
                    redirect=False,
                )
                status = response.status
            except urllib3.exceptions.HTTPError as error:  # connection refused or reset, timeout
                status, reason = 0, str(error)
            else:
                if 200 <= status < 300:
                    return True
                reason = response.data[:200].decode(errors="replace")
                if status != 429 and status < 500:
                    self.refused += 1
                    print(f"plain sink: HTTP {status}, {len(events)} events dropped: {reason}", file=sys.stderr)
                    return False
            self.retries += 1
            time.sleep(min(0.1 * 2 ** (attempt - 1), 5.0))
        raise SystemExit(f"plain sink: gave up after {MAX_ATTEMPTS} attempts (last: {status} {reason})")


def run(consumer_config: dict[str, str], topic: str, sender: Sender, events: int | None, deadline: float) -> None:
    consumer = Consumer(
        {
            **consumer_config,
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    pending: list[bytes] = []  # the request being filled: encoded events
    pending_bytes = 0
    pending_offsets: dict[tuple[str, int], int] = {}  # next offset per partition once `pending` is delivered
    pending_since = 0.0
    delivered = dropped = 0
    stored = False  # offsets stored since the last commit

    def flush() -> None:
        nonlocal pending, pending_bytes, pending_offsets, delivered, dropped, stored
        if pending:
            if sender.send(pending):
                delivered += len(pending)
            else:
                dropped += len(pending)
        if pending_offsets:  # also the offsets of records dropped before they reached a request
            consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in pending_offsets.items()])
            stored = True
        pending, pending_bytes, pending_offsets = [], 0, {}

    try:
        while (events is None or delivered < events) and time.monotonic() < deadline:
            # A partial request waits for more records only until its linger runs out.
            wait = max(0.0, pending_since + LINGER_SECONDS - time.monotonic()) if pending else 0.5
            for message in consumer.consume(1000, wait):
                if message.error():
                    continue
                try:
                    encoded = orjson.dumps(to_amplitude(decode(message.value())))
                except (ValueError, TypeError, KeyError, AttributeError):  # bad record: dropped, counted
                    dropped += 1
                    encoded = None
                if encoded is not None:
                    if len(pending) == MAX_EVENTS or pending_bytes + len(encoded) + 1 > MAX_BYTES:
                        flush()
                    if not pending:
                        pending_since = time.monotonic()
                    pending.append(encoded)
                    pending_bytes += len(encoded) + 1
                pending_offsets[(message.topic(), message.partition())] = message.offset() + 1
            if len(pending) == MAX_EVENTS or not pending or time.monotonic() - pending_since >= LINGER_SECONDS:
                flush()  # (with nothing pending: stores the offsets of records it dropped, if any)
            if stored:
                consumer.commit(asynchronous=True)
                stored = False
        flush()
        if stored:
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    print(
        f"plain sink: {delivered} delivered, {dropped} dropped, {sender.requests} requests "
        f"({sender.retries} retried, {sender.refused} refused)",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="A plain-loop Amplitude sink (the peer in bench/sink_throughput.py).")
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("base_url", help="the Amplitude API (or stand-in) base URL, e.g. http://127.0.0.1:8089")
    parser.add_argument("api_key")
    parser.add_argument(
        "--events", type=int, help="stop once this many events were delivered (default: at the deadline)"
    )
    parser.add_argument("--group", default="plain-sink-amplitude")
    parser.add_argument("--deadline", type=float, default=600, help="stop after this many seconds")
    parser.add_argument("-X", dest="properties", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra librdkafka consumer property (e.g. session.timeout.ms=2000)")  # fmt: skip
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.properties)
    config = {**extra, "bootstrap.servers": args.bootstrap, "group.id": args.group}
    sender = Sender(args.base_url, args.api_key)
    run(config, args.topic, sender, args.events, time.monotonic() + args.deadline)


if __name__ == "__main__":
    main()
