"""Storms and poison against each sink as a real process: real broker, real HTTP to the stand-ins.

The sinks run with the DEFAULT sink settings (SINK_MAX_ATTEMPTS 12, SINK_CIRCUIT_OPEN_AFTER 5,
request timeout and linger as shipped) except a fast backoff (0.05 s doubling to 0.5 s), so the
10 s a storm lasts once the circuit has opened are some 40 tries per item: far more than the 12 an
item may be charged. The destinations'
client-side rate limits are lifted, as for Amplitude in tests.sink_helpers, so the events go out in
about a second once the storm ends.

- A 429 storm (every request, no per-user detail) and a 401 storm (the key refused, as each API
  refuses a wrong one: Amplitude's 400 "Invalid API key", 401 elsewhere) open the circuit (/readyz
  says the destination is failing), dead-letter nothing, and everything is delivered after them.
- A stream mixing poison (records that are not Avro, maps that are not objects, numbers no API can
  take) with good events keeps the sink alive: each poison event is dead-lettered `invalid`, each
  good one delivered.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Message

from tests.kafka_helpers import produce, read_count, settings_for, settle, setup_topics
from tests.sink_helpers import DESTINATIONS, Standins, start_sink, track_events, write_events
from worker.avro_codec import EventCodec
from worker.dlq.headers import header_map
from worker.kafka.broker import free_port

pytestmark = pytest.mark.integration
# Storms test the sink's own retry and circuit rules, not the broker: the first broker chosen is enough.
FIRST_BROKER_ONLY = True

STORM_SECONDS = 10.0
DEFAULTS_BUT_FAST_BACKOFF = {
    # The shipped defaults (tests.sink_helpers.FAST_SINK_ENV changes these, so they are restated) ...
    "SINK_MAX_ATTEMPTS": "12",
    "SINK_CIRCUIT_OPEN_AFTER": "5",
    "SINK_REQUEST_TIMEOUT": "10",
    "SINK_LINGER_MS": "5",
    # ... but a fast backoff,
    "SINK_BACKOFF_INITIAL": "0.05",
    "SINK_BACKOFF_MAX": "0.5",
    # and no client-side rate limit in the way.
    "AMPLITUDE_EVENTS_PER_SECOND": "1000000",
    "BREVO_EVENTS_PER_SECOND": "1000000",
    "RETENO_EVENTS_PER_SECOND": "1000000",
}


@pytest.fixture
def settings(broker, prefix):
    settings = settings_for(broker, prefix, partitions=3)
    setup_topics(settings)
    return settings


@pytest.fixture(autouse=True)
def reset(clean_standins):
    """Every test starts with stand-ins that remember nothing and inject no fault."""


def readiness(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.read().decode()
    except urllib.error.HTTPError as error:
        return error.read().decode()
    except OSError:
        return ""


def wait_readiness(port: int, wanted: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = readiness(port)
    while not wanted(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = readiness(port)
    return seen


def _identify(message: Message, codec: EventCodec) -> str:
    try:
        return codec.decode(message.value())[0]["messageId"]
    except Exception:
        return f"raw:{message.value()!r}"


def dead_letters(messages: list[Message]) -> dict[str, dict[str, str]]:
    codec = EventCodec()
    return {_identify(m, codec): header_map(m.headers()) for m in messages}


def storm(settings, standins: Standins, destination: str, tmp_path, **faults: Any) -> None:
    """Run a sink through a STORM_SECONDS storm of `faults`, then check nothing was dead-lettered and
    everything was delivered once it ended."""
    events = track_events(200)
    standins.faults(destination, **faults)
    write_events(settings, destination, events)
    port = free_port()
    sink = start_sink(settings, destination, standins, tmp_path, METRICS_PORT=str(port), **DEFAULTS_BUT_FAST_BACKOFF)
    try:
        # (Timed from the circuit opening, not from the start: joining the group takes a few seconds.)
        seen = wait_readiness(port, lambda text: "failing" in text, 30)
        assert f"not ready: {destination} failing" in seen, seen  # the circuit opened: the sink paused
        time.sleep(STORM_SECONDS)
        refused = standins.stats(destination)["statuses"]
        # More refusals than SINK_MAX_ATTEMPTS even for Amplitude, whose one request a round carries
        # every item (the others send one request an item): each item was tried more often than it
        # may be charged, so none was charged while the circuit was open.
        assert sum(refused.values()) > 12, refused
        assert standins.received(destination) == {}
        assert dead_letters(settle(settings, f"dlq.{destination}", 1.0)) == {}, "dead-lettered during the storm"
        assert sink.alive()
        standins.faults(destination)  # the storm ends
        received = standins.wait_received(destination, len(events), timeout=60)
        assert wait_readiness(port, lambda text: text.startswith("ready"), 10).startswith("ready")
    finally:
        assert sink.terminate() == 0
    assert set(received) == {e["messageId"] for e in events}
    assert dead_letters(settle(settings, f"dlq.{destination}", 2.0)) == {}


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_a_429_storm_dead_letters_nothing_and_all_is_delivered_after_it(settings, standins, destination, tmp_path):
    storm(settings, standins, destination, tmp_path, status_storm=429, retry_after=1.0)
    assert "429" in standins.stats(destination)["statuses"]


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_a_401_storm_dead_letters_nothing_and_all_is_delivered_after_it(settings, standins, destination, tmp_path):
    storm(settings, standins, destination, tmp_path, reject_key=True)
    statuses = standins.stats(destination)["statuses"]
    assert ("400" if destination == "amplitude" else "401") in statuses, statuses


# Events the destination cannot take: each must be dead-lettered `invalid`, alone. (Only what the
# destination's mapping reads can be poison for it: Amberflo reads no context, Reteno reads it only
# for an event without a userId.)
def _poison(destination: str) -> list[dict[str, Any]]:
    events = track_events(3, prefix="poison-")
    events[0]["properties"] = [1, 2, 3]  # not an object: every destination reads properties
    if destination == "amplitude":
        # (A purchase: only with a revenue are quantity and price revenue fields that must be numbers.)
        events[1]["properties"] = {"revenue": 1, "quantity": "1e999"}  # not a finite number
        events[2]["properties"] = {"revenue": 1, "quantity": 1e300}  # an integer beyond 64 bits once rounded
    elif destination == "amberflo":
        events[1]["properties"] = {"value": "-inf"}  # a meter value that is not a finite number
        events[2]["properties"] = {"value": {"amount": 5}}  # a meter value that is not a number
    elif destination == "brevo":
        events[1]["context"] = "not an object"
        events[2]["context"] = {"traits": {"total_purchases": 2**64 - 1}}  # an attribute beyond 64 bits
    else:
        events[1]["event"] = "<;?!>"  # leaves no valid eventTypeKey
        events[2]["properties"] = "not an object"
    return events


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_a_mixed_poison_and_good_stream_keeps_the_sink_alive(settings, standins, destination, tmp_path):
    good = track_events(150)
    odd_but_good = track_events(2, prefix="odd-")
    odd_but_good[0]["context"]["traits"] = ["not", "an", "object"]  # ignored: the event is still good
    odd_but_good[1]["properties"] = {"title": "\u202e\U0001f600 e\u0301", "n": 2**63 - 1}
    poison = _poison(destination)
    garbage = [b"\x00\x01 not an avro record", b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00\x00", b""]
    codec = EventCodec()
    records: list[tuple[str | None, bytes | None]] = []
    stream = [*good[:50], *poison[:1], *odd_but_good, *good[50:100], *poison[1:], *good[100:]]
    for number, event in enumerate(stream):
        records.append((event["userId"], codec.encode(event)))
        if number % 60 == 30 and garbage:
            records.append(("garbage", garbage.pop()))
    records.extend(("garbage", value) for value in garbage)
    produce(settings, f"dest.{destination}", records)
    expected_dead = len(poison) + 3
    sink = start_sink(settings, destination, standins, tmp_path, **DEFAULTS_BUT_FAST_BACKOFF)
    try:
        delivered = {e["messageId"] for e in [*good, *odd_but_good]}
        received = standins.wait_received(destination, len(delivered), timeout=60)
        dead = dead_letters(read_count(settings, f"dlq.{destination}", expected_dead, timeout=30))
        assert sink.alive(), "the sink died on poison"
    finally:
        assert sink.terminate() == 0
    assert set(received) == delivered
    assert {name for name in dead if not name.startswith("raw:")} == {e["messageId"] for e in poison}
    assert len(dead) == expected_dead, sorted(dead)
    for headers in dead.values():
        assert headers["error_kind"] == "invalid" and headers["destination"] == destination, headers
        assert headers["error"], headers
    assert "Traceback" not in sink.log_path.read_text()
