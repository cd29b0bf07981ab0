"""The sink's defects, each pinned in process against real HTTP servers on 127.0.0.1.

The DeliveryEngine runs its own asyncio loop on its own thread, as in a sink; its HTTP peer is
either a scripted aiohttp server (each test says what every request gets) or the stand-in
destinations (worker.standins) with their faults. Where a defect is on the Kafka side (containment
of bad events, the buffer that pauses every partition), SinkStrategy itself runs with an in-memory
stand-in for the Kafka producer and consumed messages, and the real destination modules.

1. One bad event never stops the sink: any exception from decoding or mapping dead-letters that
   event `invalid`; an item the destination cannot encode fails alone, not its request.
2. The circuit counts every "refusing everyone" answer (5xx, timeouts, 401, 403, a 429 without
   per-user detail), so such storms are not charged to the items.
3. One report per item, even when an exception comes after part of a request was reported.
4. Retry-After and API hints are validated and capped; the backoff cannot overflow.
5. Items held for a throttled user do not fill the shared buffer that pauses every partition.
6. Brevo and Reteno keep under their documented rate limits by default.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.engine_reports import per_item
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.destinations import amberflo, amplitude, base, brevo, reteno
from worker.destinations.base import (
    Endpoint,
    Item,
    ItemResult,
    Outcome,
    Request,
    Unmappable,
    Verdict,
    classify_status,
    parse_retry_after,
)
from worker.dlq.headers import Kind, header_map
from worker.kafka.consumer_loop import Backpressure
from worker.kafka.offsets import Batch, OffsetTracker
from worker.names import Names
from worker.sink.delivery import DeliveryEngine, Pending
from worker.sink.reports import CircuitReport, Delivered, Failed, ItemReport
from worker.sink.settings import SinkSettings
from worker.sink.strategy import SinkStrategy
from worker.standins.app import STATE_KEY, make_app
from worker.standins.faults import Faults

FAST = {"linger_ms": 5.0, "backoff_initial": 0.01, "backoff_max": 0.05, "request_timeout": 2.0}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


# -- a scripted HTTP server and the destination the engine talks to it through --------------------

Answer = tuple[int, Any, dict[str, str]]


@dataclass
class Received:
    ids: list[str]
    status: int = 0


class ServerThread:
    """An aiohttp application on 127.0.0.1, on a thread and event loop of its own."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return self.runner.addresses[0][1]

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the server's loop (its state belongs to that thread)."""

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Scripted:
    """POST /events answered by `answer(number, events)`: (status, JSON body, headers)."""

    def __init__(self, answer: Callable[[int, list[dict[str, Any]]], Answer]) -> None:
        self.answer = answer
        self.received: list[Received] = []
        self.lock = threading.Lock()
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self.server = ServerThread(app)
        self.url = self.server.url

    async def _handle(self, request: web.Request) -> web.Response:
        events = orjson.loads(await request.read())["events"]
        with self.lock:
            number = len(self.received)
            entry = Received([e["id"] for e in events])
            self.received.append(entry)
        status, body, headers = self.answer(number, events)
        entry.status = status
        return web.Response(status=status, body=orjson.dumps(body), headers=headers, content_type="application/json")

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def accepted(self) -> list[str]:
        return [i for r in self.requests() if 200 <= r.status < 300 for i in r.ids]


class Defects:
    """One JSON endpoint of up to 10 items. A 400 `{"bad": [i]}` names bad items, a 429
    `{"throttled_users": [u]}` holds back those users; any other answer follows the common rule,
    except 418, on which `classify` raises (a destination bug met on an unexpected answer). `encode`
    serialises the payloads as they are, so a payload orjson refuses fails the encode."""

    name = "defects"
    events_per_second = None

    def __init__(self, base_url: str) -> None:
        self.endpoints = {"events": Endpoint("events", "POST", "default", "/events", max_items=10)}
        self.base_urls = {"default": base_url}

    def map_event(self, event: Any) -> list[Item]:
        raise NotImplementedError

    def encode(self, endpoint: Endpoint, items: Sequence[Item]) -> Request:
        body = orjson.dumps({"events": [{"id": i.dedupe_id, "user": i.user, **i.payload} for i in items]})
        return Request(endpoint.method, endpoint.base, endpoint.path, {"Content-Type": "application/json"}, body)

    def classify(
        self, endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, headers: Mapping[str, str]
    ) -> Outcome:
        if status == 418:
            raise RuntimeError("classify bug: an answer nobody foresaw")
        if status == 207:  # taken, but reading item `bug_at`'s verdict meets a bug
            return Outcome(status, ItemResult(Verdict.OK, ""), BugAt(orjson.loads(body)["bug_at"]))
        default = classify_status(status, body, headers)
        parsed = orjson.loads(body) if body else {}
        if status == 400 and parsed.get("bad"):
            per_item = {i: ItemResult(Verdict.PERMANENT, f"HTTP 400: item {i} is bad") for i in parsed["bad"]}
            return Outcome(status, ItemResult(Verdict.RESEND, "a batch-mate was bad"), per_item)
        if status == 429 and parsed.get("throttled_users"):
            users = set(parsed["throttled_users"])
            throttled = ItemResult(Verdict.THROTTLED, "HTTP 429: user throttled", default.retry_after)
            per_item = {i: throttled for i, item in enumerate(items) if item.user in users}
            return Outcome(status, ItemResult(Verdict.RESEND, "a batch-mate was throttled"), per_item)
        return Outcome(status, default)


class BugAt(dict[int, ItemResult]):
    """Per-item verdicts whose reading raises at one index, as a destination's bug would."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def get(self, index: int, default: Any = None) -> Any:  # type: ignore[override]
        if index == self.index:
            raise RuntimeError(f"classify bug reading item {index}")
        return default


class Reports:
    """The engine's report callable, kept for the test's thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.all: list[Any] = []

    def __call__(self, report: Any) -> None:
        with self.lock:
            self.all.extend(per_item(report))

    def items(self) -> list[ItemReport]:
        with self.lock:
            return [r for r in self.all if isinstance(r, ItemReport)]

    def circuit(self) -> list[CircuitReport]:
        with self.lock:
            return [r for r in self.all if isinstance(r, CircuitReport)]

    def outcome(self, owner: Any) -> Any:
        found = [r.outcome for r in self.items() if r.owner == owner]
        assert len(found) == 1, f"{owner!r} has {len(found)} reports: {found}"
        return found[0]

    def wait(self, count: int, timeout: float = 10.0) -> list[ItemReport]:
        wait_for(lambda: len(self.items()) >= count, timeout, f"{count} item reports (have {len(self.items())})")
        return self.items()


def pending(count: int, users: Sequence[str] = ("u1",), start: int = 0, **payload: Any) -> list[Pending]:
    """Pending items owned by their number, with dedupe id "id-<number>"."""
    made = []
    for n in range(start, start + count):
        body = {"n": n, **payload}
        made.append(Pending(Item("events", body, f"id-{n}", users[n % len(users)]), n, 20))
    return made


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(answer: Callable[[int, list[dict[str, Any]]], Answer]) -> Scripted:
        servers.append(Scripted(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.server.stop()


@pytest.fixture
def engine() -> Iterator[Callable[..., tuple[DeliveryEngine, Reports]]]:
    engines: list[DeliveryEngine] = []

    def start(destination: Any, settings: SinkSettings | None = None) -> tuple[DeliveryEngine, Reports]:
        reports = Reports()
        running = DeliveryEngine(destination, settings or SinkSettings(**FAST), reports)
        running.start()
        engines.append(running)
        return running, reports

    yield start
    for running in engines:
        running.stop()


def one_report_each(engine: DeliveryEngine, reports: Reports, owners: Sequence[Any]) -> None:
    engine.stop()
    assert Counter(r.owner for r in reports.items()) == Counter(owners)


# -- the stand-in destinations, and SinkStrategy on an in-memory Kafka ----------------------------

KEYS = {"amplitude": "k-amplitude-0123", "amberflo": "k-amberflo", "reteno": "k-reteno", "brevo": "k-brevo"}


class Standins:
    def __init__(self) -> None:
        self.app = make_app(KEYS)
        self.server = ServerThread(self.app)
        self.url = self.server.url

    def faults(self, destination: str, **faults: Any) -> None:
        state = self.app[STATE_KEY][destination]
        self.server.call(lambda: state.set_faults(Faults(**faults)))

    def received(self, destination: str) -> dict[str, Any]:
        state = self.app[STATE_KEY][destination]
        return self.server.call(lambda: dict(state.received))

    def statuses(self, destination: str) -> Counter[int]:
        state = self.app[STATE_KEY][destination]
        return self.server.call(lambda: Counter(state.statuses))


@pytest.fixture
def standins() -> Iterator[Standins]:
    running = Standins()
    yield running
    running.server.stop()


def destination(name: str, url: str, **config: Any) -> Any:
    if name == "amplitude":
        return amplitude.make(amplitude.AmplitudeConfig(api_key=KEYS[name], base_url=url, **config))
    if name == "amberflo":
        return amberflo.make(amberflo.AmberfloConfig(api_key=KEYS[name], base_url=url, **config))
    if name == "reteno":
        return reteno.make(reteno.RetenoConfig(access_key=KEYS[name], base_url=url, mobile_base_url=url, **config))
    return brevo.make(brevo.BrevoConfig(api_key=KEYS[name], base_url=url, **config))


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        self._topic, self._partition, self._offset, self._value = topic, partition, offset, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes:
        return b"key"

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


class FakeProducer:
    """Takes dead letters and acknowledges them on the next poll."""

    def __init__(self) -> None:
        self.produced: list[dict[str, str]] = []
        self._unacknowledged: list[Callable[[Any, Any], None]] = []

    def produce(self, topic: str, value: Any, key: Any = None, on_delivery: Any = None, headers: Any = None) -> None:
        self.produced.append(header_map(headers))
        if on_delivery is not None:
            self._unacknowledged.append(on_delivery)

    def poll(self, timeout: float = 0.0) -> int:
        callbacks, self._unacknowledged = self._unacknowledged, []
        for callback in callbacks:
            callback(None, None)
        return len(callbacks)

    def flush(self, timeout: float) -> int:
        self.poll()
        return 0

    def __len__(self) -> int:
        return len(self._unacknowledged)


class FakeClients:
    def __init__(self) -> None:
        self.made = FakeProducer()

    def producer(self) -> FakeProducer:
        return self.made


class Sink:
    """SinkStrategy as the consumer loop drives it, on messages of one partition."""

    def __init__(self, destination: Any, settings: SinkSettings) -> None:
        self.clients = FakeClients()
        self.strategy = SinkStrategy(self.clients, Names(), settings, destination)  # type: ignore[arg-type]
        self.offsets = OffsetTracker()
        self.next_offset = 0
        self.codec = EventCodec()

    def batch(self, records: Sequence[dict[str, Any] | bytes]) -> Batch:
        messages = []
        for record in records:
            value = record if isinstance(record, bytes) else self.codec.encode(record)  # type: ignore[arg-type]
            messages.append(FakeMessage("segment.dest.test", 0, self.next_offset, value))
            self.next_offset += 1
        return self.offsets.track(messages)  # type: ignore[arg-type]

    def submit(self, records: Sequence[dict[str, Any] | bytes]) -> Batch:
        batch = self.batch(records)
        self.strategy.submit(batch)
        return batch

    def wait_done(self, batch: Batch, timeout: float = 10.0) -> None:
        def done() -> bool:
            self.strategy.poll()
            return all(ticket.finished for ticket in batch.tickets.values())

        wait_for(done, timeout, "the batch done")

    def dead_letters(self) -> dict[int, dict[str, str]]:
        """Dead letters by the offset of their message."""
        return {int(h["original_offset"]): h for h in self.clients.made.produced}

    def close(self) -> None:
        self.strategy.close()


def event(number: int, user: str = "user-00001", **fields: Any) -> dict[str, Any]:
    """A normalised track event with messageId "m<number>"."""
    made: dict[str, Any] = {
        "type": "track",
        "messageId": f"m{number:04d}",
        "userId": user,
        "anonymousId": f"anon-{user}",
        "event": "Order Completed",
        "timestamp": "2026-11-22T10:00:00.000Z",
        "originalTimestamp": "2026-11-22T10:00:00.000Z",
        "receivedAt": "2026-11-22T10:00:01.000Z",
        "properties": {"revenue": 9.5, "quantity": 2},
        "traits": {},
        "context": {"traits": {"email": f"{user}@example.com"}},
        "integrations": {},
    }
    made.update(fields)
    return made


SINK = {**FAST, "backoff_max": 0.2}


# == 1. containment ================================================================================


def test_events_that_crash_the_amplitude_mapping_are_dead_lettered_invalid_and_the_sink_goes_on(standins):
    """Seen in production: each of these stopped the sink, or (quantity 1e300, an integer beyond 64
    bits once truncated) failed every batch-mate's request at encode time."""
    sink = Sink(destination("amplitude", standins.url, events_per_second=1e6), SinkSettings(**SINK))
    try:
        good = [event(n, f"user-{n:05d}") for n in range(6)]
        poison = {
            6: event(6, properties={"revenue": 1, "quantity": "1e999"}),
            7: event(7, properties={"revenue": 1, "quantity": "nan"}),
            8: event(8, properties={"revenue": 1, "quantity": 1e300}),
            9: event(9, properties={"revenue": "-inf"}),
            10: event(10, properties=[1, 2]),
            11: b"\xc3\x01 not an avro record",
        }
        odd_but_good = event(12, context={"traits": ["not", "an", "object"]})  # context.traits is ignored
        batch = sink.submit([*good, *poison.values(), odd_but_good])
        sink.wait_done(batch)
        dead = sink.dead_letters()
        assert set(dead) == set(poison)
        assert all(h["error_kind"] == "invalid" for h in dead.values())
        assert "properties.quantity must be a finite number" in dead[6]["error"]
        assert "properties.quantity must be a finite number" in dead[7]["error"]
        assert "properties.quantity is out of the 64-bit integer range" in dead[8]["error"]
        assert "properties.revenue must be a finite number" in dead[9]["error"]
        assert dead[10]["error"] == "properties must be an object, got list"
        assert dead[11]["error"].startswith("cannot decode the record")
        assert set(standins.received("amplitude")) == {e["messageId"] for e in [*good, odd_but_good]}
    finally:
        sink.close()


class _Exploding(amplitude.AmplitudeDestination):
    """A mapping bug: events named "Boom" raise an exception no mapping author foresaw."""

    def map_event(self, event: Any) -> list[Item]:
        if event.get("event") == "Boom":
            return [1 / 0]  # type: ignore[list-item]
        if event.get("event") == "Wrong shape":
            return "not a list of items"  # type: ignore[return-value]
        return super().map_event(event)


def test_any_exception_from_map_event_dead_letters_that_event_with_its_type_and_message(standins):
    config = amplitude.AmplitudeConfig(api_key=KEYS["amplitude"], base_url=standins.url, events_per_second=1e6)
    sink = Sink(_Exploding(config), SinkSettings(**SINK))
    try:
        batch = sink.submit([event(0), event(1, event="Boom"), event(2, event="Wrong shape"), event(3)])
        sink.wait_done(batch)
        dead = sink.dead_letters()
        assert set(dead) == {1, 2}
        assert dead[1]["error"] == "ZeroDivisionError: division by zero" and dead[1]["error_kind"] == "invalid"
        assert dead[2]["error"].startswith("TypeError: amplitude.map_event returned")
        assert set(standins.received("amplitude")) == {"m0000", "m0003"}
    finally:
        sink.close()


def test_an_item_the_destination_cannot_encode_fails_alone_and_its_batch_mates_go_in_one_request(scripted, engine):
    server = scripted(lambda _n, _e: (200, {}, {}))
    running, reports = engine(Defects(server.url), SinkSettings(**{**FAST, "max_attempts": 3}))
    work = pending(10)
    work[4] = Pending(Item("events", {"n": 4, "big": 2**70}, "id-4", "u1"), 4, 20)  # orjson: beyond 64 bits
    running.submit(work)
    reports.wait(10)
    failed = reports.outcome(4)
    assert isinstance(failed, Failed) and failed.kind is Kind.INVALID
    assert failed.reason == "TypeError: Integer exceeds 64-bit range"
    assert all(isinstance(reports.outcome(n), Delivered) for n in range(10) if n != 4)
    assert [sorted(r.ids) for r in server.requests()] == [sorted(f"id-{n}" for n in range(10) if n != 4)]
    one_report_each(running, reports, range(10))


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        ({"quantity": float("inf")}, "properties.quantity must be a finite number, got inf"),
        ({"quantity": float("nan")}, "properties.quantity must be a finite number, got nan"),
        ({"quantity": "1e999"}, "properties.quantity must be a finite number, got '1e999'"),
        ({"quantity": 2**64}, "properties.quantity is out of the 64-bit integer range: 18446744073709551616"),
        ({"quantity": 9.3e18}, "properties.quantity is out of the 64-bit integer range: 9.3e+18"),
        ({"price": float("-inf")}, "properties.price must be a finite number, got -inf"),
        ({"revenue": 10**400}, "properties.revenue is too large for a number"),
        ({"revenue": "NaN"}, "properties.revenue must be a finite number, got 'NaN'"),
    ],
)
def test_amplitude_numeric_coercion_rejects_non_finite_and_out_of_range_values(properties, reason):
    with pytest.raises(Unmappable) as raised:
        # (With revenue: only then are quantity and price revenue fields that must be numbers.)
        amplitude.make().map_event(event(0, properties={"revenue": 1, **properties}))  # type: ignore[arg-type]
    assert raised.value.reason.startswith(reason)


def test_amplitude_numeric_coercion_keeps_what_it_always_took():
    payload = (
        amplitude.make()
        .map_event(event(0, properties={"quantity": "3.9", "price": "2", "revenue": 2**63 - 1}))[0]
        .payload
    )  # type: ignore[arg-type]
    assert (payload["quantity"], payload["price"], payload["revenue"]) == (4, 2.0, float(2**63 - 1))  # rounded
    ignored = amplitude.make().map_event(event(1, properties={"quantity": "a few", "revenue": {"usd": 3}}))[0].payload  # type: ignore[arg-type]
    assert "quantity" not in ignored and "revenue" not in ignored


@pytest.mark.parametrize("traits", [["a", "list"], "a string", 42, None])
def test_context_traits_that_are_not_an_object_are_ignored_by_every_destination(traits):
    for make in (amplitude.make, amberflo.make, brevo.make, reteno.make):
        dest = make()
        items = dest.map_event(event(0, context={"traits": traits}))  # type: ignore[arg-type]
        assert items
        for item in items:
            dest.encode(dest.endpoints[item.endpoint], [item])


@pytest.mark.parametrize("make", [amplitude.make, amberflo.make, brevo.make, reteno.make])
def test_values_no_api_can_take_are_unmappable_with_a_reason_not_a_crash(make):
    hostile = [
        event(0, properties={"nested": {"deep": [2**65]}}),  # orjson refuses integers beyond 64 bits
        event(1, properties="not an object"),
        event(2, context=["not", "an", "object"]),
        event(3, traits={"phone": 2**80}, type="identify"),
    ]
    dest = make()
    for hostile_event in hostile:
        try:
            items = dest.map_event(hostile_event)  # type: ignore[arg-type]
        except (Unmappable, base.Skip):
            continue
        for item in items:  # whatever maps must encode
            dest.encode(dest.endpoints[item.endpoint], [item])


def test_non_finite_numbers_are_unmappable_for_amberflo_values_and_brevo_attributes():
    with pytest.raises(Unmappable, match=r"properties\.value must be a finite number"):
        amberflo.make().map_event(event(0, properties={"value": "inf"}))  # type: ignore[arg-type]
    identify = event(1, type="identify", traits={"email": "a@example.com", "total_purchases": float("nan")})
    with pytest.raises(Unmappable, match=r"traits\.total_purchases must be a finite number"):
        brevo.make().map_event(identify)  # type: ignore[arg-type]
    identify["traits"] = {"email": "a@example.com", "total_purchases": 2**64}
    with pytest.raises(Unmappable, match=r"traits\.total_purchases is out of the 64-bit integer range"):
        brevo.make().map_event(identify)  # type: ignore[arg-type]


# == 2. the circuit counts every "refusing everyone" answer ========================================


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        (429, {"error": "too many requests"}, {"Retry-After": "0"}),  # no per-user detail
        (401, {"error": "invalid api key"}, {}),
        (403, {"error": "forbidden"}, {}),
        (503, {"error": "unavailable"}, {}),
    ],
)
def test_a_storm_refusing_everyone_opens_the_circuit_and_dead_letters_nothing(scripted, engine, status, body, headers):
    storm = threading.Event()
    storm.set()
    server = scripted(lambda _n, _e: (status, body, headers) if storm.is_set() else (200, {}, {}))
    settings = SinkSettings(**{**FAST, "max_attempts": 3, "circuit_open_after": 2})
    running, reports = engine(Defects(server.url), settings)
    running.submit(pending(5, users=("u1", "u2")))
    wait_for(
        lambda: len(server.requests()) >= 20 or reports.items(),
        10,
        "a storm of failed requests, many more than max_attempts",
    )
    assert reports.items() == [], f"dead-lettered during a {status} storm: {reports.items()[:1]}"
    assert reports.circuit()[:1] == [CircuitReport(open=True, consecutive_failures=2)]
    storm.clear()
    reports.wait(5)
    assert all(isinstance(r.outcome, Delivered) for r in reports.items())
    wait_for(lambda: reports.circuit()[-1:] == [CircuitReport(open=False, consecutive_failures=0)], 5, "closed")
    one_report_each(running, reports, range(5))


def test_a_429_naming_throttled_users_does_not_open_the_circuit(scripted, engine):
    def answer(number: int, events: list[dict[str, Any]]) -> Answer:
        if any(e["user"] == "u1" for e in events) and number < 30:
            return 429, {"throttled_users": ["u1"]}, {"Retry-After": "0.01"}
        return 200, {}, {}

    settings = SinkSettings(**{**FAST, "max_attempts": 1000, "circuit_open_after": 2})
    running, reports = engine(Defects(scripted(answer).url), settings)
    running.submit(pending(6, users=("u1", "u2")))
    reports.wait(6)
    assert all(isinstance(r.outcome, Delivered) for r in reports.items())
    assert reports.circuit() == []  # the destination worked for u2 all along
    one_report_each(running, reports, range(6))


def test_a_rejected_amplitude_key_opens_the_circuit_and_holds_the_items_until_it_is_accepted(standins, engine):
    amp = destination("amplitude", standins.url, events_per_second=1e6)
    settings = SinkSettings(**{**FAST, "max_attempts": 3, "circuit_open_after": 2})
    standins.faults("amplitude", reject_key=True)  # Amplitude's 400 "Invalid API key" on every request
    running, reports = engine(amp, settings)
    items = [item for n in range(4) for item in amp.map_event(event(n, f"user-{n:05d}"))]
    running.submit([Pending(item, n, 500) for n, item in enumerate(items)])
    wait_for(lambda: standins.statuses("amplitude")[400] >= 12, 10, "many refused requests")
    assert reports.items() == []
    assert reports.circuit()[:1] == [CircuitReport(open=True, consecutive_failures=2)]
    standins.faults("amplitude")
    reports.wait(4)
    assert all(isinstance(r.outcome, Delivered) for r in reports.items())
    assert set(standins.received("amplitude")) == {f"m{n:04d}" for n in range(4)}
    one_report_each(running, reports, range(4))


# == 3. one report per item ========================================================================


def test_an_exception_after_part_of_a_request_was_reported_does_not_report_those_items_again(scripted, engine):
    def answer(number: int, events: list[dict[str, Any]]) -> Answer:
        if number == 0:  # item 3 is bad; the rest are resent at once ...
            return 400, {"bad": [i for i, e in enumerate(events) if e["n"] == 3]}, {}
        if number == 1:  # ... and that resend meets a classify bug
            return 418, {}, {}
        return 200, {}, {}

    server = scripted(answer)
    running, reports = engine(Defects(server.url))
    running.submit(pending(10))
    reports.wait(10)
    time.sleep(0.3)  # a second report would come within the backoff
    failed = reports.outcome(3)
    assert isinstance(failed, Failed) and failed.kind is Kind.PERMANENT
    assert all(isinstance(reports.outcome(n), Delivered) for n in range(10) if n != 3)
    assert "id-3" not in [i for r in server.requests()[1:] for i in r.ids]  # never sent again
    assert Counter(server.accepted()) == Counter(f"id-{n}" for n in range(10) if n != 3)
    one_report_each(running, reports, range(10))


def test_an_exception_reading_one_items_verdict_keeps_the_items_before_it_delivered(scripted, engine):
    # The destination took the whole request; reading item 5's verdict fails. Items 0-4 were read
    # as delivered: they are reported so and never sent again; 5-9 are retried.
    def answer(number: int, _events: list[dict[str, Any]]) -> Answer:
        return (207, {"bug_at": 5}, {}) if number == 0 else (200, {}, {})

    server = scripted(answer)
    running, reports = engine(Defects(server.url))
    running.submit(pending(10))
    reports.wait(10)
    time.sleep(0.3)  # a second report would come within the backoff
    assert all(isinstance(reports.outcome(n), Delivered) for n in range(10))
    later = [i for r in server.requests()[1:] for i in r.ids]
    assert sorted(later) == sorted(f"id-{n}" for n in range(5, 10)), later
    one_report_each(running, reports, range(10))


def test_an_exception_in_the_second_half_of_a_bisection_does_not_resend_the_delivered_first_half(scripted, engine):
    def answer(_number: int, events: list[dict[str, Any]]) -> Answer:
        ids = {e["n"] for e in events}
        if len(ids) == 4:
            return 400, {"error": "something in here is bad"}, {}  # names no item: bisect
        if ids == {2, 3} and not answer.raised:  # type: ignore[attr-defined]
            answer.raised = True  # type: ignore[attr-defined]
            return 418, {}, {}
        return 200, {}, {}

    answer.raised = False  # type: ignore[attr-defined]
    server = scripted(answer)
    running, reports = engine(Defects(server.url))
    running.submit(pending(4))
    reports.wait(4)
    time.sleep(0.3)
    assert all(isinstance(reports.outcome(n), Delivered) for n in range(4))
    assert Counter(server.accepted()) == Counter(f"id-{n}" for n in range(4))  # each delivered once
    one_report_each(running, reports, range(4))


# == 4. hints validated and capped; the backoff cannot overflow ====================================


@pytest.mark.parametrize(
    "retry_after", ["inf", "1e309", "99999999999", "Fri, 31 Dec 9999 23:59:59 GMT", "nan", "-5", "soon"]
)
def test_retry_after_is_validated_and_capped_at_backoff_max(scripted, engine, retry_after):
    server = scripted(lambda n, _e: (503, {}, {"Retry-After": retry_after}) if n == 0 else (200, {}, {}))
    running, reports = engine(Defects(server.url), SinkSettings(**{**FAST, "backoff_max": 0.2}))
    running.submit(pending(3))
    reports.wait(3, timeout=3)
    assert all(isinstance(r.outcome, Delivered) for r in reports.items())
    one_report_each(running, reports, range(3))


def test_a_throttled_users_hint_is_capped_too(scripted, engine):
    server = scripted(
        lambda n, _e: (429, {"throttled_users": ["u1"]}, {"Retry-After": "inf"}) if n == 0 else (200, {}, {})
    )
    running, reports = engine(Defects(server.url), SinkSettings(**{**FAST, "backoff_max": 0.2}))
    running.submit(pending(4, users=("u1", "u2")))
    reports.wait(4, timeout=3)
    assert all(isinstance(r.outcome, Delivered) for r in reports.items())
    one_report_each(running, reports, range(4))


def test_a_wait_never_goes_beyond_the_items_remaining_retry_budget(scripted, engine):
    server = scripted(lambda n, _e: (503, {}, {"Retry-After": "30"}) if n == 0 else (200, {}, {}))
    settings = SinkSettings(**{**FAST, "backoff_max": 60.0, "max_retry_seconds": 0.5})
    running, reports = engine(Defects(server.url), settings)
    started = time.monotonic()
    running.submit(pending(2))
    reports.wait(2, timeout=3)
    assert time.monotonic() - started < 2.0
    assert len(server.requests()) == 2  # its one more try came when its budget ran out, not after 30 s
    one_report_each(running, reports, range(2))


def test_the_backoff_does_not_overflow_after_a_thousand_attempts(scripted, engine):
    server = scripted(lambda n, _e: (503, {}, {}) if n == 0 else (200, {}, {}))
    running, reports = engine(Defects(server.url), SinkSettings(**{**FAST, "max_attempts": 10_000}))
    work = pending(3)
    for item in work:
        item.attempts = 1_100  # retried through a long outage, uncharged while the circuit was open
    running.submit(work)
    reports.wait(3, timeout=3)
    assert all(isinstance(r.outcome, Delivered) for r in reports.items())
    one_report_each(running, reports, range(3))


@pytest.mark.parametrize(
    "value", ["inf", "-inf", "nan", "1e309", "-1", "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT"]
)
def test_parsed_hints_are_finite_non_negative_and_bounded(value):
    seconds = parse_retry_after(value, now=1_800_000_000.0)
    assert seconds is None or (math.isfinite(seconds) and 0 <= seconds <= 86_400)
    reset = brevo.make().classify(brevo.EVENTS, [], 429, b"{}", {"x-sib-ratelimit-reset": value}).default
    assert reset.retry_after is None or (math.isfinite(reset.retry_after) and reset.retry_after >= 0)


# == 5. a throttled heavy user does not stall everyone =============================================


def test_items_held_for_a_throttled_user_do_not_fill_the_buffer_that_pauses_every_partition(standins):
    standins.faults("amplitude", throttled_users=["user-heavy"], retry_after=3)
    settings = SinkSettings(**{**FAST, "backoff_max": 3.0, "max_buffered_events": 20})
    sink = Sink(destination("amplitude", standins.url, events_per_second=1e6), settings)
    try:
        heavy = sink.submit([event(n, "user-heavy") for n in range(30)])  # more than the buffer
        wait_for(lambda: standins.statuses("amplitude")[429] >= 1, 5, "the heavy user throttled")
        deadline = time.monotonic() + 1
        while getattr(sink.strategy, "held", 0) < 30 and time.monotonic() < deadline:
            sink.strategy.poll()
            time.sleep(0.01)
        others = sink.submit([event(100 + n, f"user-{n:05d}") for n in range(10)])  # not refused
        sink.wait_done(others, timeout=2.5)  # delivered while the heavy user is still held
        assert not any(ticket.finished for ticket in heavy.tickets.values())
        standins.faults("amplitude")
        sink.wait_done(heavy, timeout=10)
        assert len(standins.received("amplitude")) == 40 and sink.dead_letters() == {}
        assert (sink.strategy.outstanding, sink.strategy.held) == (0, 0)
    finally:
        sink.close()


def test_held_items_beyond_the_per_user_cap_count_towards_the_buffer_again(standins):
    standins.faults("amplitude", throttled_users=["user-heavy"], retry_after=3)
    settings = SinkSettings(**{**FAST, "backoff_max": 3.0, "max_buffered_events": 20, "max_held_per_user": 5})
    sink = Sink(destination("amplitude", standins.url, events_per_second=1e6), settings)
    try:
        sink.submit([event(n, "user-heavy") for n in range(30)])
        wait_for(lambda: (sink.strategy.poll(), sink.strategy.held)[1] == 5, 5, "5 held apart")
        assert sink.strategy.buffered == 25  # memory stays bounded: the rest pause the partitions
        with pytest.raises(Backpressure):
            sink.submit([event(100, "user-00001")])
    finally:
        sink.close()


def test_the_engine_reports_how_many_items_it_holds_for_throttled_users(scripted, engine):
    from worker.sink.reports import HoldReport

    server = scripted(
        lambda n, _e: (429, {"throttled_users": ["u1"]}, {"Retry-After": "0.3"}) if n == 0 else (200, {}, {})
    )
    running, reports = engine(Defects(server.url), SinkSettings(**{**FAST, "backoff_max": 1.0, "max_held_per_user": 3}))
    running.submit(pending(10, users=("u1", "u2")))  # u1 owns 5
    reports.wait(10, timeout=5)
    holds = [r.held for r in reports.all if isinstance(r, HoldReport)]
    assert holds == [3, 0]  # at most max_held_per_user of one user count apart; all released
    one_report_each(running, reports, range(10))


# == 6. client-side rate limits from the APIs' documentation =======================================


def test_brevo_and_reteno_default_to_their_documented_rate_limits_and_take_a_setting():
    assert brevo.make().events_per_second == 10  # developers.brevo.com/docs/api-limits: POST /v3/events 10 RPS
    assert reteno.make().events_per_second == 200  # docs.reteno.com/reference/rate-limits: 200 RPS shared default
    config = Config.from_sources({"BREVO_EVENTS_PER_SECOND": "3", "RETENO_EVENTS_PER_SECOND": "7"})
    assert config.destination("brevo", require_key=False).events_per_second == 3
    assert config.destination("reteno", require_key=False).events_per_second == 7


def test_a_rate_limited_sink_buffers_no_more_than_its_destination_takes_within_a_drain():
    # Brevo takes 10 events/s; a rebalance waits 10 s (SINK_REQUEST_TIMEOUT 10 s, twice, capped):
    # 100 buffered events, not 10,000 that would be delivered after the drain, uncommitted, and sent
    # again by the next owner (Brevo has no event id to dedupe them).
    from worker.sink.strategy import buffer_limit

    settings = SinkSettings()
    assert buffer_limit(settings, brevo.make()) == 100
    assert buffer_limit(settings, reteno.make()) == 2_000
    assert buffer_limit(settings, amplitude.make()) == 10_000  # 1,000 events/s: the default buffer
    assert buffer_limit(SinkSettings(request_timeout=1.0), brevo.make()) == 20
    unlimited = Config.from_sources({"BREVO_EVENTS_PER_SECOND": "1000000"}).destination("brevo", require_key=False)
    assert buffer_limit(settings, unlimited) == settings.max_buffered_events


def test_the_brevo_sink_keeps_under_10_requests_per_second_by_default(standins, engine):
    dest = destination("brevo", standins.url)
    running, reports = engine(dest, SinkSettings(**FAST))
    items = [item for n in range(25) for item in dest.map_event(event(n, f"user-{n:05d}"))]
    started = time.monotonic()
    running.submit([Pending(item, n, 200) for n, item in enumerate(items)])
    reports.wait(25, timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.4, f"25 requests in {elapsed:.2f}s: over 10 a second after the first second's 10"
    assert len(standins.received("brevo")) == 25
    one_report_each(running, reports, range(25))
