"""The Amplitude stand-in over real loopback HTTP: auth, limits, validation, dedupe, faults.

Requests are built with the real destination's `encode`, so these tests also prove that what we send
is what the (stand-in) API accepts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import orjson

from tests.standin_helpers import serve_standin
from worker.destinations.amplitude import AmplitudeConfig, make
from worker.destinations.base import Item, Verdict
from worker.standins import amplitude as amplitude_standin
from worker.standins.faults import Faults, StandinState

API_KEY = "amp-test-key"
URL_PATH = "/2/httpapi"


def serving(state: StandinState) -> AbstractAsyncContextManager[str]:
    return serve_standin(amplitude_standin.register, state, API_KEY)


def run(scenario: Callable[[str, aiohttp.ClientSession, StandinState], Awaitable[None]], **faults: Any) -> StandinState:
    state = StandinState("amplitude")
    state.set_faults(Faults(**faults))

    async def main() -> None:
        async with serving(state) as base, aiohttp.ClientSession() as session:
            await scenario(base, session, state)

    asyncio.run(main())
    return state


def items(count: int, user: str = "user-{i:04d}", start: int = 0) -> list[Item]:
    destination = make(AmplitudeConfig(api_key=API_KEY))
    return [
        destination.map_event(
            {
                "type": "track",
                "event": "Song Played",
                "userId": user.format(i=i),
                "anonymousId": f"anon-{i:04d}",
                "messageId": f"msg-{i:04d}",
                "timestamp": "2024-05-01T12:00:00.000Z",
                "properties": {"n": i},
                "context": {},
            }
        )[0]
        for i in range(start, start + count)
    ]


async def send(
    session: aiohttp.ClientSession, base: str, batch: list[Item], key: str = API_KEY, min_id_length: int | None = None
) -> tuple[int, dict[str, Any], Any]:
    destination = make(AmplitudeConfig(api_key=key, min_id_length=min_id_length))
    request = destination.encode(destination.endpoints["events"], batch)
    async with session.post(base + request.path, data=request.body, headers=dict(request.headers)) as response:
        body = await response.read()
        outcome = destination.classify(
            destination.endpoints["events"], batch, response.status, body, dict(response.headers)
        )
        return response.status, orjson.loads(body), outcome


async def post_json(session: aiohttp.ClientSession, base: str, payload: Any) -> tuple[int, dict[str, Any]]:
    async with session.post(base + URL_PATH, data=orjson.dumps(payload)) as response:
        return response.status, orjson.loads(await response.read())


def test_accepts_a_batch_with_the_documented_success_body_and_dedupes_by_insert_id() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, body, outcome = await send(session, base, items(3))
        assert status == 200
        assert body["code"] == 200 and body["events_ingested"] == 3
        assert body["payload_size_bytes"] > 0 and body["server_upload_time"] > 1_700_000_000_000
        assert outcome.default.verdict is Verdict.OK
        await send(session, base, items(3))  # a retry of the same events
        assert list(state.received) == ["msg-0000", "msg-0001", "msg-0002"]
        assert state.duplicates == 3

    state = run(scenario)
    assert state.statuses[200] == 2


def test_wrong_or_missing_api_key_is_a_documented_400() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, body, outcome = await send(session, base, items(1), key="wrong-key")
        assert (status, body["error"]) == (400, "Invalid API key: wrong-key")
        assert outcome.default.verdict is Verdict.RETRY
        status, body = await post_json(session, base, {"events": [{"event_type": "x", "user_id": "user-1"}]})
        assert (status, body["missing_field"]) == (400, "api_key")
        assert not state.received

    assert run(scenario).statuses[400] == 2


def test_invalid_json_is_a_400() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        async with session.post(base + URL_PATH, data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["error"] == "Invalid JSON request body"

    run(scenario)


def test_more_than_1000_events_or_more_than_1_mb_is_413() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, body, outcome = await send(session, base, items(1001))
        assert (status, body) == (413, {"code": 413, "error": "Payload too large"})
        assert outcome.default.verdict is Verdict.SPLIT
        big = [{"event_type": "x", "user_id": "user-1", "insert_id": "i", "event_properties": {"b": "x" * 1_000_001}}]
        status, _ = await post_json(session, base, {"api_key": API_KEY, "events": big})
        assert status == 413
        assert not state.received

    assert run(scenario).statuses[413] == 2


def test_missing_fields_and_short_ids_reject_the_request_naming_event_indexes() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        events = [
            {"event_type": "ok", "user_id": "user-1", "insert_id": "a"},
            {"user_id": "user-2", "insert_id": "b"},
            {"event_type": "short", "user_id": "u3", "insert_id": "c"},
            {"event_type": "no ids", "insert_id": "d"},
        ]
        status, body = await post_json(session, base, {"api_key": API_KEY, "events": events})
        assert status == 400
        assert body["events_with_missing_fields"] == {"event_type": [1], "device_id": [3]}
        assert body["events_with_invalid_id_lengths"] == {"user_id": [2]}
        assert not state.received  # a 400 ingests nothing
        status, _ = await post_json(
            session, base, {"api_key": API_KEY, "events": events[2:3], "options": {"min_id_length": 2}}
        )
        assert status == 200
        assert list(state.received) == ["c"]

    run(scenario)


def test_poison_insert_ids_get_a_400_and_the_batch_mates_are_resent() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        batch = items(4)
        status, body, outcome = await send(session, base, batch)
        assert status == 400
        assert body["events_with_invalid_fields"] == {"insert_id": [2]}
        assert [outcome.for_item(i).verdict for i in range(4)] == [
            Verdict.RESEND,
            Verdict.RESEND,
            Verdict.PERMANENT,
            Verdict.RESEND,
        ]
        resend = [item for i, item in enumerate(batch) if outcome.for_item(i).verdict is Verdict.RESEND]
        status, _, _ = await send(session, base, resend)
        assert status == 200
        assert sorted(state.received) == ["msg-0000", "msg-0001", "msg-0003"]

    run(scenario, poison_ids=["msg-0002"])


def test_throttled_users_get_429_naming_them_and_nothing_is_ingested() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        batch = items(3)
        status, body, outcome = await send(session, base, batch)
        assert status == 429
        assert body["throttled_users"] == {"user-0001": 31}
        assert body["throttled_events"] == [1]
        assert body["error"] == "Too many requests for some devices and users"
        assert not state.received
        assert [outcome.for_item(i).verdict for i in range(3)] == [Verdict.RESEND, Verdict.THROTTLED, Verdict.RESEND]
        assert outcome.for_item(1).retry_after == 0.5  # the stand-in's Retry-After
        status, _, _ = await send(session, base, [batch[0], batch[2]])
        assert status == 200
        assert sorted(state.received) == ["msg-0000", "msg-0002"]

    run(scenario, throttled_users=["user-0001"], retry_after=0.5)


def test_injected_throttle_uses_the_documented_body_and_is_retried() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, body, outcome = await send(session, base, items(2))
        assert status == 429
        assert body["code"] == 429 and body["throttled_users"] == {} and "eps_threshold" in body
        assert outcome.default.verdict is Verdict.RETRY
        assert outcome.default.retry_after == 2.0
        status, _, _ = await send(session, base, items(2))
        assert status == 200

    state = run(scenario, throttle_requests=1, retry_after=2)
    assert (state.statuses[429], state.statuses[200]) == (1, 1)


def test_injected_5xx_and_outage_ingest_nothing_and_are_retried() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        for _ in range(3):
            status, _, outcome = await send(session, base, items(2))
            assert status in (500, 502, 503)
            assert outcome.default.verdict is Verdict.RETRY
        assert not state.received

    state = run(scenario, error_rate=1.0)
    assert sum(state.statuses.values()) == 3
    down = run(lambda base, session, state: _expect_status(base, session, 503), down=True)
    assert down.statuses[503] == 1


async def _expect_status(base: str, session: aiohttp.ClientSession, expected: int) -> None:
    status, _, _ = await send(session, base, items(1))
    assert status == expected
