"""The Reteno stand-in over loopback: auth, validation, dedupe, poison ids, injected faults, and the
destination's own requests going through it and being classified."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.standin_helpers import serve_standin
from worker.destinations.base import Verdict
from worker.destinations.reteno import RetenoConfig, make
from worker.standins import reteno
from worker.standins.faults import Faults, StandinState

API_KEY = "reteno-test-key"
AUTH = {"X-Reteno-Access-Key": API_KEY}

EVENT = {
    "eventTypeKey": "Order Completed",
    "keyValue": "msg-1",
    "params": [{"name": "externalCustomerId", "value": "user-1"}, {"name": "total", "value": "9.5"}],
}
DEVICE = {"deviceId": "dev-1", "externalUserId": "user-1", "osType": "IOS", "category": "MOBILE"}
CONTACT = {"channels": [{"type": "email", "value": "a@example.com"}], "externalCustomerId": "user-1"}


@asynccontextmanager
async def standin(state: StandinState) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with serve_standin(reteno.register, state, API_KEY) as base, aiohttp.ClientSession() as session:
        yield session, base


Scenario = Callable[[aiohttp.ClientSession, str], Awaitable[Any]]


def run(scenario: Scenario, state: StandinState | None = None) -> Any:
    async def main() -> Any:
        async with standin(state or StandinState("reteno")) as (session, base):
            return await scenario(session, base)

    return asyncio.run(main())


async def post(session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None):
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes | str) else {"json": body}
    async with session.post(url, headers=AUTH if headers is None else headers, **kwargs) as response:
        return response.status, await response.text(), dict(response.headers)


# --- auth ---------------------------------------------------------------------------------------


def test_missing_or_wrong_access_key_is_401_on_every_endpoint():
    state = StandinState("reteno")

    async def scenario(session, base):
        return [
            (await post(session, base + path, body, headers))[0]
            for path, body in (("/api/v2/event", EVENT), ("/api/v1/device", DEVICE), ("/api/v1/contact", CONTACT))
            for headers in ({}, {"X-Reteno-Access-Key": "wrong"})
        ]

    assert run(scenario, state) == [401] * 6
    assert state.received == {}
    assert state.statuses[401] == 6


# --- validation ---------------------------------------------------------------------------------


def test_invalid_bodies_are_400_with_a_message():
    cases = [
        ("/api/v2/event", b"{not json"),
        ("/api/v2/event", [EVENT]),
        ("/api/v2/event", {**EVENT, "eventTypeKey": ""}),
        ("/api/v2/event", {**EVENT, "eventTypeKey": "Bad/Name"}),
        ("/api/v2/event", {**EVENT, "keyValue": "x" * 301}),
        ("/api/v2/event", {**EVENT, "params": {"externalCustomerId": "u"}}),
        ("/api/v1/device", {**DEVICE, "deviceId": ""}),
        ("/api/v1/device", {**DEVICE, "category": "DESKTOP"}),
        ("/api/v1/device", {**DEVICE, "osType": "WINDOWS"}),
        ("/api/v1/contact", {**CONTACT, "channels": []}),
        ("/api/v1/contact", {**CONTACT, "channels": [{"type": "email", "value": ""}]}),
        ("/api/v1/contact", {**CONTACT, "fields": [{"id": "x", "value": "y"}]}),
    ]
    state = StandinState("reteno")

    async def scenario(session, base):
        return [await post(session, base + path, body) for path, body in cases]

    responses = run(scenario, state)

    assert [status for status, _, _ in responses] == [400] * len(cases)
    assert all('"message"' in text for _, text, _ in responses)
    assert state.received == {}


def test_event_without_contact_identifier_gets_the_documented_required_params_body():
    event = {**EVENT, "params": [{"name": "total", "value": "1"}]}

    status, text, _ = run(lambda session, base: post(session, base + "/api/v2/event", event))

    assert status == 400
    assert text.startswith("The event should have the following params: ")
    assert '"externalCustomerId"' in text


def test_oversized_event_is_refused():
    event = {**EVENT, "params": [*EVENT["params"], {"name": "blob", "value": "x" * 21_000}]}

    status, text, _ = run(lambda session, base: post(session, base + "/api/v2/event", event))

    assert status == 400
    assert "content exceeds" in text


# --- dedupe -------------------------------------------------------------------------------------


def test_events_are_deduplicated_by_key_value():
    state = StandinState("reteno")

    async def scenario(session, base):
        first = await post(session, base + "/api/v2/event", EVENT)
        again = await post(session, base + "/api/v2/event", EVENT)
        other = await post(session, base + "/api/v2/event", {**EVENT, "keyValue": "msg-2"})
        return [r[0] for r in (first, again, other)]

    assert run(scenario, state) == [200, 200, 200]
    assert list(state.received) == ["msg-1", "msg-2"]
    assert state.duplicates == 1
    assert state.statuses[200] == 3


def test_devices_upsert_by_device_and_user():
    state = StandinState("reteno")

    async def scenario(session, base):
        await post(session, base + "/api/v1/device", DEVICE)
        await post(session, base + "/api/v1/device", DEVICE)  # identical: a duplicate
        await post(session, base + "/api/v1/device", {**DEVICE, "appVersion": "2.0"})  # an update
        await post(session, base + "/api/v1/device", {**DEVICE, "externalUserId": "user-2"})

    run(scenario, state)

    assert state.received == {
        "device:dev-1:user-1": {**DEVICE, "appVersion": "2.0"},
        "device:dev-1:user-2": {**DEVICE, "externalUserId": "user-2"},
    }
    assert state.duplicates == 1


def test_contacts_upsert_by_external_id_and_keep_their_id():
    state = StandinState("reteno")
    updated = {**CONTACT, "fields": [{"id": 7, "value": "pro"}]}

    async def scenario(session, base):
        first = await post(session, base + "/api/v1/contact", CONTACT)
        second = await post(session, base + "/api/v1/contact", updated)
        other = await post(session, base + "/api/v1/contact", {**CONTACT, "externalCustomerId": "user-2"})
        return [(status, text) for status, text, _ in (first, second, other)]

    responses = run(scenario, state)

    assert responses == [(200, '{"id": 1}'), (200, '{"id": 1}'), (200, '{"id": 2}')]
    assert state.received["contact:user-1"] == updated
    assert "contact:user-2" in state.received


# --- faults -------------------------------------------------------------------------------------


def test_poison_key_value_is_refused_with_the_documented_400():
    state = StandinState("reteno")
    state.set_faults(Faults(poison_ids=["msg-1"]))

    async def scenario(session, base):
        poisoned = await post(session, base + "/api/v2/event", EVENT)
        healthy = await post(session, base + "/api/v2/event", {**EVENT, "keyValue": "msg-2"})
        return poisoned, healthy

    (status, text, _), (healthy_status, _, _) = run(scenario, state)

    assert status == 400
    assert text.startswith("The event should have the following params")
    assert healthy_status == 200
    assert list(state.received) == ["msg-2"]


def test_injected_throttle_and_outage_answer_before_auth_and_store_nothing():
    state = StandinState("reteno")
    state.set_faults(Faults(throttle_requests=1, retry_after=2.5))

    async def scenario(session, base):
        throttled = await post(session, base + "/api/v2/event", EVENT, headers={})
        state.set_faults(Faults(down=True))
        down = await post(session, base + "/api/v2/event", EVENT)
        state.set_faults(Faults())
        healthy = await post(session, base + "/api/v2/event", EVENT)
        return throttled, down, healthy

    throttled, down, healthy = run(scenario, state)

    assert (throttled[0], throttled[2]["Retry-After"]) == (429, "2.5")
    assert '"message"' in throttled[1]
    assert down[0] == 503
    assert healthy[0] == 200
    assert list(state.received) == ["msg-1"]
    assert dict(state.statuses) == {429: 1, 503: 1, 200: 1}


def test_injected_5xx_error_rate():
    state = StandinState("reteno")
    state.set_faults(Faults(error_rate=1.0, seed=3))

    status, text, _ = run(lambda session, base: post(session, base + "/api/v2/event", EVENT), state)

    assert status in (500, 502, 503)
    assert '"message"' in text
    assert state.received == {}


# --- the destination against the stand-in -------------------------------------------------------

IDENTIFY = {
    "type": "identify",
    "messageId": "m-identify",
    "userId": "user-9",
    "anonymousId": "anon-9",
    "traits": {"email": "nine@example.com", "plan": "pro"},
    "context": {"device": {"id": "dev-9"}, "os": {"name": "Android", "version": "14"}},
}
TRACK = {
    "type": "track",
    "event": "Order Completed",
    "messageId": "m-track",
    "userId": "user-9",
    "anonymousId": "anon-9",
    "properties": {"total": 19.99},
    "context": {},
}


async def deliver(session: aiohttp.ClientSession, base: str, destination, event) -> list[Any]:
    """What the sink runner does for one event: map, encode, send, classify."""
    results = []
    for item in destination.map_event(event):
        endpoint = destination.endpoints[item.endpoint]
        request = destination.encode(endpoint, [item])
        async with session.post(base + request.path, data=request.body, headers=dict(request.headers)) as resp:
            body = await resp.read()
            results.append(destination.classify(endpoint, [item], resp.status, body, resp.headers).for_item(0))
    return results


def test_destination_requests_are_accepted_and_events_recorded_under_their_message_id():
    state = StandinState("reteno")
    destination = make(RetenoConfig(access_key=API_KEY, contact_fields={"plan": 12}))

    async def scenario(session, base):
        return [r.verdict for e in (IDENTIFY, TRACK, TRACK) for r in await deliver(session, base, destination, e)]

    assert run(scenario, state) == [Verdict.OK] * 4
    assert set(state.received) == {"device:dev-9:user-9", "contact:user-9", "m-track"}
    assert state.duplicates == 1  # the redelivered track


def test_destination_classifies_stand_in_poison_and_throttle():
    state = StandinState("reteno")
    destination = make(RetenoConfig(access_key=API_KEY))

    async def scenario(session, base):
        state.set_faults(Faults(poison_ids=["m-track"]))
        [poisoned] = await deliver(session, base, destination, TRACK)
        state.set_faults(Faults(throttle_requests=1, retry_after=4))
        [throttled] = await deliver(session, base, destination, TRACK)
        return poisoned, throttled

    poisoned, throttled = run(scenario, state)

    assert poisoned.verdict is Verdict.PERMANENT
    assert poisoned.reason == "HTTP 400: event type requires params ['orderId']"
    assert (throttled.verdict, throttled.retry_after) == (Verdict.RETRY, 4.0)
