"""What one core can do at most for the Amplitude sink: its pure CPU work per event, in process.

The sink's role (`bench/sink_throughput.py`) does decode -> map -> encode for every event, and around
that Kafka, HTTP, per-user order and bookkeeping. This script times only the first three, with no
broker, no sockets and no threads, on the same realistic backlog records the throughput bench
writes (`realistic_normalised_events`), for the product and for the plain loop's peer
(`bench/plain_sink.py`, the same decode -> map -> JSON it does):

- product decode: `EventCodec.decode` (the sink's Avro single-object decoder, JSON fields parsed);
- product decode + map: that, then `AmplitudeDestination.map_event` (each item's JSON encoded);
- product decode + map + request: that, then `encode` into requests of 1,000 items;
- plain decode + map + request: `plain_sink.decode`, `to_amplitude`, `orjson.dumps` of each
  1,000-event body.

Each is printed as us an event and as the events/s one core would reach if the process did nothing
else: a ceiling for the role, which also pays for everything around these steps. Medians of
`--runs` timings, all sides in each run, one after another on the same records.

    .venv/bin/python bench/sink_ceiling.py [--events 20000] [--runs 3] [--target 40000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plain_sink
from sink_throughput import realistic_normalised_events

from worker.avro_codec import EventCodec
from worker.destinations.amplitude import EVENTS_ENDPOINT, AmplitudeConfig, make
from worker.runtime import settle_gc

REQUEST_ITEMS = 1000  # both sides' requests: Amplitude's HTTP V2 limit, what each sink sends when busy


def product_sides(records: list[bytes]) -> dict[str, Callable[[], object]]:
    codec = EventCodec()
    destination = make(AmplitudeConfig(api_key="ceiling-key"))
    endpoint = destination.endpoints[EVENTS_ENDPOINT]

    # Each side keeps what the role keeps: nothing of a decoded record once it is mapped, the items
    # (their JSON bytes) until their request is built.
    def decode() -> object:
        for record in records:
            codec.decode(record)
        return None

    def decode_map() -> object:
        return [item for record in records for item in destination.map_event(codec.decode(record)[0])]

    def decode_map_request() -> object:
        items = [item for record in records for item in destination.map_event(codec.decode(record)[0])]
        return [destination.encode(endpoint, items[i : i + REQUEST_ITEMS]) for i in range(0, len(items), REQUEST_ITEMS)]

    return {
        "product decode": decode,
        "product decode + map": decode_map,
        "product decode + map + request": decode_map_request,
    }


def plain_side(records: list[bytes]) -> dict[str, Callable[[], object]]:
    def decode_map_request() -> object:  # a consumed batch's events at a time, as the plain loop holds them
        bodies = []
        for start in range(0, len(records), REQUEST_ITEMS):
            batch = records[start : start + REQUEST_ITEMS]
            events = [plain_sink.to_amplitude(plain_sink.decode(record)) for record in batch]
            bodies.append(orjson.dumps({"api_key": "ceiling-key", "events": events}))
        return bodies

    return {"plain decode + map + request": decode_map_request}


def timed(work: Callable[[], object]) -> float:
    """Seconds for one pass; the result is kept until the clock stops (freeing is part of the work)."""
    started = time.perf_counter()
    result = work()
    del result
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target", type=float, default=40_000.0, help="events/s the role should reach")
    args = parser.parse_args()

    records = [value for _key, value, _id in realistic_normalised_events(args.events)]
    settle_gc()  # the collector tuned as a role tunes it (worker.runtime)
    sides = {**product_sides(records), **plain_side(records)}
    for work in sides.values():
        work()  # warm: imports, caches, the allocator's arenas
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.runs):
        for name, work in sides.items():
            seconds[name].append(timed(work))

    mean_bytes = sum(map(len, records)) / len(records)
    print(f"{len(records):,} realistic dest-topic records (mean {mean_bytes:,.0f} bytes), medians of {args.runs} runs:")
    budget_us = 1e6 / args.target
    for name, runs in seconds.items():
        per_event_us = statistics.median(runs) / len(records) * 1e6
        ceiling = 1e6 / per_event_us
        print(
            f"  {name:32} {per_event_us:6.2f} us an event -> at most {ceiling:8,.0f} events/s a core"
            f" ({ceiling / args.target:.2f}x the {args.target:,.0f} target)"
        )
    print(f"  the target leaves {budget_us:.1f} us an event for everything the role does")


if __name__ == "__main__":
    main()
