"""The Brevo stand-in over loopback: auth, validation, dedupe, contact upserts, poison ids, injected
faults in Brevo's own shape, and the destination's own requests going through it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.standin_helpers import serve_standin
from worker.destinations.base import Verdict
from worker.destinations.brevo import BrevoConfig, make
from worker.standins import brevo
from worker.standins.faults import Faults, StandinState

API_KEY = "xkeysib-test"
AUTH = {"api-key": API_KEY}

EVENT = {
    "event_name": "video_played",
    "event_date": "2024-02-06T20:59:23.383Z",
    "identifiers": {"email_id": "jane@example.com"},
    "contact_properties": {"AGE": 32},
    "event_properties": {"duration": 142, "messageId": "msg-1"},
}
CONTACT = {"email": "jane@example.com", "ext_id": "user-1", "attributes": {"FIRSTNAME": "Jane"}}


@asynccontextmanager
async def standin(state: StandinState) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with serve_standin(brevo.register, state, API_KEY) as base, aiohttp.ClientSession() as session:
        yield session, base


Scenario = Callable[[aiohttp.ClientSession, str], Awaitable[Any]]


def run(scenario: Scenario, state: StandinState | None = None) -> Any:
    async def main() -> Any:
        async with standin(state or StandinState("brevo")) as (session, base):
            return await scenario(session, base)

    return asyncio.run(main())


async def post(session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None):
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes | str) else {"json": body}
    async with session.post(url, headers=AUTH if headers is None else headers, **kwargs) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else None), dict(response.headers)


# --- auth ---------------------------------------------------------------------------------------


def test_missing_or_wrong_api_key_is_401_with_brevo_error_body():
    state = StandinState("brevo")

    async def scenario(session, base):
        return [
            await post(session, base + path, body, headers)
            for path, body in (("/v3/events", EVENT), ("/v3/contacts", CONTACT))
            for headers in ({}, {"api-key": "wrong"})
        ]

    responses = run(scenario, state)

    assert [(status, body) for status, body, _ in responses] == [
        (401, {"code": "unauthorized", "message": "Key not found"})
    ] * 4
    assert state.received == {}


# --- validation ---------------------------------------------------------------------------------


def test_invalid_events_get_400_with_code_and_message():
    cases = [
        (b"{", "bad_request"),
        ({**EVENT, "event_name": ""}, "missing_parameter"),
        ({**EVENT, "event_name": "video played"}, "invalid_parameter"),
        ({**EVENT, "identifiers": {}}, "missing_parameter"),
        ({k: v for k, v in EVENT.items() if k != "identifiers"}, "missing_parameter"),
        ({**EVENT, "event_properties": {"bad key": 1}}, "invalid_parameter"),
        ({**EVENT, "event_properties": {"nested": {"bad key": 1}}}, "invalid_parameter"),
        ({**EVENT, "event_properties": {"blob": "x" * 52_000}}, "invalid_parameter"),
        ({**EVENT, "contact_properties": {"ADDRESS": {"city": "Paris"}}}, "invalid_parameter"),
        ({**EVENT, "event_date": "yesterday"}, "invalid_parameter"),
    ]
    state = StandinState("brevo")

    async def scenario(session, base):
        return [await post(session, base + "/v3/events", body) for body, _ in cases]

    responses = run(scenario, state)

    assert [(status, body["code"]) for status, body, _ in responses] == [(400, code) for _, code in cases]
    assert all(body["message"] for _, body, _ in responses)
    assert state.received == {}


def test_invalid_contacts_get_400_with_code_and_message():
    cases = [
        ({"attributes": {"FIRSTNAME": "Jane"}}, "missing_parameter"),
        ({**CONTACT, "email": "not-an-email"}, "invalid_parameter"),
        ({**CONTACT, "listIds": ["ten"]}, "invalid_parameter"),
        ({**CONTACT, "attributes": []}, "invalid_parameter"),
        ({**CONTACT, "updateEnabled": "yes"}, "invalid_parameter"),
    ]

    async def scenario(session, base):
        return [await post(session, base + "/v3/contacts", body) for body, _ in cases]

    responses = run(scenario)

    assert [(status, body["code"]) for status, body, _ in responses] == [(400, code) for _, code in cases]


# --- events: 204 and dedupe by the messageId property ---------------------------------------------


def test_events_answer_204_and_are_deduplicated_by_message_id():
    state = StandinState("brevo")
    other = {**EVENT, "event_properties": {"messageId": "msg-2"}}
    no_id = {**EVENT, "event_properties": {}}

    async def scenario(session, base):
        return [(await post(session, base + "/v3/events", body))[:2] for body in (EVENT, EVENT, other, no_id, no_id)]

    assert run(scenario, state) == [(204, None)] * 5
    assert [k for k in state.received if k.startswith("msg-")] == ["msg-1", "msg-2"]
    assert len(state.received) == 4  # events without a messageId are always new, as in Brevo
    assert state.duplicates == 1


# --- contacts: create, upsert, conflicts ----------------------------------------------------------


def test_contact_is_created_with_201_then_updated_with_204_when_update_enabled():
    state = StandinState("brevo")
    upsert = {**CONTACT, "updateEnabled": True, "attributes": {"FIRSTNAME": "Janet"}}

    async def scenario(session, base):
        created = await post(session, base + "/v3/contacts", {**CONTACT, "updateEnabled": True})
        updated = await post(session, base + "/v3/contacts", upsert)
        repeated = await post(session, base + "/v3/contacts", upsert)
        return [r[:2] for r in (created, updated, repeated)]

    assert run(scenario, state) == [(201, {"id": 1}), (204, None), (204, None)]
    assert state.received == {"contact:jane@example.com": upsert}
    assert state.duplicates == 1


def test_existing_contact_without_update_enabled_is_duplicate_parameter():
    state = StandinState("brevo")

    async def scenario(session, base):
        await post(session, base + "/v3/contacts", CONTACT)
        return (await post(session, base + "/v3/contacts", {"ext_id": "user-1"}))[:2]

    assert run(scenario, state) == (400, {"code": "duplicate_parameter", "message": "Contact already exist"})
    assert state.received == {"contact:jane@example.com": CONTACT}


def test_contact_found_by_ext_id_is_updated_under_its_first_key():
    state = StandinState("brevo")
    by_ext_id = {"ext_id": "user-1", "attributes": {"LASTNAME": "Doe"}, "updateEnabled": True}

    async def scenario(session, base):
        await post(session, base + "/v3/contacts", CONTACT)
        return (await post(session, base + "/v3/contacts", by_ext_id))[0]

    assert run(scenario, state) == 204
    assert state.received == {"contact:jane@example.com": by_ext_id}


def test_email_and_ext_id_of_two_different_contacts_conflict():
    state = StandinState("brevo")

    async def scenario(session, base):
        await post(session, base + "/v3/contacts", {"email": "a@example.com"})
        await post(session, base + "/v3/contacts", {"ext_id": "user-b"})
        conflict = {"email": "a@example.com", "ext_id": "user-b", "updateEnabled": True}
        return await post(session, base + "/v3/contacts", conflict)

    status, body, _ = run(scenario, state)

    assert (status, body["code"]) == (400, "duplicate_parameter")
    assert state.received == {
        "contact:a@example.com": {"email": "a@example.com"},
        "contact:user-b": {"ext_id": "user-b"},
    }


# --- faults -------------------------------------------------------------------------------------


def test_poison_message_id_and_contact_are_refused_as_invalid_parameter():
    state = StandinState("brevo")
    state.set_faults(Faults(poison_ids=["msg-1", "user-1"]))

    async def scenario(session, base):
        event = await post(session, base + "/v3/events", EVENT)
        contact = await post(session, base + "/v3/contacts", CONTACT)
        healthy = await post(session, base + "/v3/events", {**EVENT, "event_properties": {"messageId": "msg-2"}})
        return event, contact, healthy

    event, contact, healthy = run(scenario, state)

    assert (event[0], event[1]["code"]) == (400, "invalid_parameter")
    assert (contact[0], contact[1]["code"]) == (400, "invalid_parameter")
    assert healthy[0] == 204
    assert list(state.received) == ["msg-2"]


def test_injected_429_uses_brevo_rate_limit_headers_not_retry_after():
    state = StandinState("brevo")
    state.set_faults(Faults(throttle_requests=1, retry_after=3))

    status, body, headers = run(lambda session, base: post(session, base + "/v3/events", EVENT), state)

    assert status == 429
    assert set(body) == {"code", "message"}
    assert headers["x-sib-ratelimit-reset"] == "3"
    assert headers["x-sib-ratelimit-remaining"] == "0"
    assert "Retry-After" not in headers
    assert state.received == {}


def test_injected_outage_and_5xx_use_brevo_error_shape():
    state = StandinState("brevo")

    async def scenario(session, base):
        state.set_faults(Faults(down=True))
        down = await post(session, base + "/v3/contacts", CONTACT)
        state.set_faults(Faults(error_rate=1.0, seed=1))
        error = await post(session, base + "/v3/events", EVENT)
        return down, error

    down, error = run(scenario, state)

    assert down[0] == 503 and set(down[1]) == {"code", "message"}
    assert error[0] in (500, 502, 503) and set(error[1]) == {"code", "message"}
    assert state.received == {}
    assert sum(state.statuses.values()) == 2


# --- the destination against the stand-in -------------------------------------------------------

IDENTIFY = {
    "type": "identify",
    "messageId": "m-identify",
    "userId": "user-9",
    "anonymousId": "anon-9",
    "traits": {"email": "nine@example.com", "firstName": "Nina", "phone": "+33612345678"},
    "context": {},
}
TRACK = {
    "type": "track",
    "event": "Order Completed",
    "messageId": "m-track",
    "userId": "user-9",
    "anonymousId": "anon-9",
    "properties": {"total": 19.99, "Order ID": "o-1"},
    "context": {"traits": {"email": "nine@example.com"}},
    "timestamp": "2024-05-01T12:00:00.000Z",
}


async def deliver(session: aiohttp.ClientSession, base: str, destination, event) -> Any:
    """What the sink runner does for one event: map, encode, send, classify."""
    [item] = destination.map_event(event)
    endpoint = destination.endpoints[item.endpoint]
    request = destination.encode(endpoint, [item])
    async with session.post(base + request.path, data=request.body, headers=dict(request.headers)) as resp:
        body = await resp.read()
        return destination.classify(endpoint, [item], resp.status, body, resp.headers).for_item(0)


def test_destination_requests_are_accepted_and_events_recorded_under_their_message_id():
    state = StandinState("brevo")
    destination = make(BrevoConfig(api_key=API_KEY, list_ids=[3]))

    async def scenario(session, base):
        return [(await deliver(session, base, destination, e)).verdict for e in (IDENTIFY, IDENTIFY, TRACK, TRACK)]

    assert run(scenario, state) == [Verdict.OK] * 4
    assert set(state.received) == {"contact:nine@example.com", "m-track"}
    assert state.received["contact:nine@example.com"]["listIds"] == [3]
    assert state.duplicates == 2  # the repeated identify and the redelivered track
    assert dict(state.statuses) == {201: 1, 204: 3}


def test_destination_classifies_stand_in_throttle_poison_and_bad_key():
    state = StandinState("brevo")

    async def scenario(session, base):
        destination = make(BrevoConfig(api_key=API_KEY))
        state.set_faults(Faults(throttle_requests=1, retry_after=2))
        throttled = await deliver(session, base, destination, TRACK)
        state.set_faults(Faults(poison_ids=["m-track"]))
        poisoned = await deliver(session, base, destination, TRACK)
        state.set_faults(Faults())
        unauthorized = await deliver(session, base, make(BrevoConfig(api_key="wrong")), TRACK)
        return throttled, poisoned, unauthorized

    throttled, poisoned, unauthorized = run(scenario, state)

    assert (throttled.verdict, throttled.retry_after) == (Verdict.RETRY, 2.0)
    assert poisoned.verdict is Verdict.PERMANENT
    assert poisoned.reason.startswith("HTTP 400 invalid_parameter")
    assert unauthorized.verdict is Verdict.RETRY and "Key not found" in unauthorized.reason
    assert state.received == {}
