"""The Amberflo stand-in over real loopback HTTP: auth, validation, limits, dedupe, faults.

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
from worker.destinations.amberflo import AmberfloConfig, make
from worker.destinations.base import Item, Outcome, Verdict
from worker.segment.event import SegmentEvent
from worker.standins import amberflo as amberflo_standin
from worker.standins.faults import Faults, StandinState

API_KEY = "amberflo-test-key"


def serving(state: StandinState) -> AbstractAsyncContextManager[str]:
    return serve_standin(amberflo_standin.register, state, API_KEY)


def run(scenario: Callable[[str, aiohttp.ClientSession, StandinState], Awaitable[None]], **faults: Any) -> StandinState:
    state = StandinState("amberflo")
    state.set_faults(Faults(**faults))

    async def main() -> None:
        async with serving(state) as base, aiohttp.ClientSession() as session:
            await scenario(base, session, state)

    asyncio.run(main())
    return state


def event(**fields: Any) -> SegmentEvent:
    base: dict[str, Any] = {
        "anonymousId": "anon-1",
        "timestamp": "2021-04-26T14:01:46.909Z",
        "properties": {},
        "traits": {},
        "context": {},
    }
    base.update(fields)
    return base  # type: ignore[return-value]


def meters(count: int) -> list[Item]:
    destination = make(AmberfloConfig(api_key=API_KEY))
    return [
        destination.map_event(
            event(
                type="track",
                userId="cust-1",
                event="ApiCalls",
                messageId=f"m{i}",
                properties={"value": i + 1, "region": "us-west-2"},
            )
        )[0]
        for i in range(count)
    ]


def customer(user_id: str = "cust-1", **traits: Any) -> Item:
    return make(AmberfloConfig(api_key=API_KEY)).map_event(
        event(type="identify", userId=user_id, messageId=f"id-{user_id}", traits=traits)
    )[0]


async def send(
    session: aiohttp.ClientSession, base: str, batch: list[Item], key: str = API_KEY
) -> tuple[int, Any, Outcome]:
    destination = make(AmberfloConfig(api_key=key))
    endpoint = destination.endpoints[batch[0].endpoint]
    request = destination.encode(endpoint, batch)
    async with session.request(
        request.method, base + request.path, data=request.body, headers=dict(request.headers)
    ) as response:
        body = await response.read()
        outcome = destination.classify(endpoint, batch, response.status, body, dict(response.headers))
        return response.status, orjson.loads(body), outcome


def test_ingests_meter_records_and_dedupes_by_unique_id() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, _, outcome = await send(session, base, meters(3))
        assert status == 200 and outcome.default.verdict is Verdict.OK
        await send(session, base, meters(3))  # a retry
        assert list(state.received) == ["m0", "m1", "m2"]
        assert state.received["m2"]["meterValue"] == 3.0
        assert state.duplicates == 3

    assert run(scenario).statuses[200] == 2


def test_records_without_unique_id_are_deduped_on_the_whole_record() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        record = {"customerId": "c1", "meterApiName": "m", "meterValue": 1, "meterTimeInMillis": 1619445706909}
        for _ in range(2):
            async with session.post(base + "/ingest", json=[record], headers={"X-API-KEY": API_KEY}) as response:
                assert response.status == 200
        assert (len(state.received), state.duplicates) == (1, 1)

    run(scenario)


def test_wrong_api_key_is_401_and_retried() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, body, outcome = await send(session, base, meters(1), key="wrong")
        assert (status, body) == (401, {"message": "Unauthorized"})
        assert outcome.default.verdict is Verdict.RETRY
        status, _, _ = await send(session, base, [customer()], key="wrong")
        assert status == 401
        assert not state.received

    assert run(scenario).statuses[401] == 2


def test_invalid_records_reject_the_request() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        good = {"customerId": "c1", "meterApiName": "m", "meterValue": 1, "meterTimeInMillis": 1619445706909}
        bad_dimensions = {**good, "uniqueId": "u2", "dimensions": {"logins": 5}}
        no_customer = {k: v for k, v in good.items() if k != "customerId"}
        async with session.post(
            base + "/ingest", json=[good, bad_dimensions, no_customer], headers={"X-API-KEY": API_KEY}
        ) as response:
            assert response.status == 400
            body = await response.json()
        assert [error["index"] for error in body["errors"]] == [1, 2]
        assert not state.received

    run(scenario)


def test_poison_unique_id_fails_the_batch_which_splits_down_to_the_bad_record() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        batch = meters(4)
        status, _, outcome = await send(session, base, batch)
        assert status == 400 and outcome.default.verdict is Verdict.SPLIT
        for half in (batch[:2], batch[2:]):
            status, _, outcome = await send(session, base, half)
            if status == 400:
                assert outcome.default.verdict is Verdict.SPLIT
                for single in half:
                    status, _, outcome = await send(session, base, [single])
                    expected = Verdict.PERMANENT if single.dedupe_id == "m1" else Verdict.OK
                    assert outcome.default.verdict is expected
        assert sorted(state.received) == ["m0", "m2", "m3"]

    run(scenario, poison_ids=["m1"])


def test_body_over_the_limit_is_413_and_split() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        huge = {
            "customerId": "c1",
            "meterApiName": "m",
            "meterValue": 1,
            "meterTimeInMillis": 1,
            "dimensions": {"blob": "x" * (amberflo_standin.MAX_BODY_BYTES + 1)},
        }
        async with session.post(base + "/ingest", json=[huge], headers={"X-API-KEY": API_KEY}) as response:
            assert response.status == 413
        destination = make(AmberfloConfig(api_key=API_KEY))
        outcome = destination.classify(destination.endpoints["ingest"], meters(2), 413, b"", {})
        assert outcome.default.verdict is Verdict.SPLIT
        assert not state.received

    run(scenario)


def test_put_customer_upserts_and_counts_repeats_as_duplicates() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, body, _ = await send(session, base, [customer(name="Initech", plan="basic")])
        assert status == 200
        assert body["customerId"] == "cust-1" and body["customerName"] == "Initech"
        await send(session, base, [customer(name="Initech", plan="basic")])
        assert state.duplicates == 1
        await send(session, base, [customer(name="Initech", plan="premium")])
        assert state.received["customer:cust-1"]["traits"] == {"plan": "premium"}
        assert len(state.received) == 1

    assert run(scenario).statuses[200] == 3


def test_customer_without_name_or_with_non_string_traits_is_400() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        for payload in ({"customerId": "c1"}, {"customerId": "c1", "customerName": "C", "traits": {"n": 5}}):
            async with session.put(base + "/customers", json=payload, headers={"X-API-KEY": API_KEY}) as response:
                assert response.status == 400
        assert not state.received

    run(scenario)


def test_injected_5xx_and_throttle_are_retried_and_ingest_nothing() -> None:
    async def scenario(base: str, session: aiohttp.ClientSession, state: StandinState) -> None:
        status, _, outcome = await send(session, base, meters(2))
        assert status == 429
        assert (outcome.default.verdict, outcome.default.retry_after) == (Verdict.RETRY, 3.0)
        status, _, outcome = await send(session, base, [customer()])
        assert status in (500, 502, 503)
        assert outcome.default.verdict is Verdict.RETRY
        assert not state.received

    state = run(scenario, throttle_requests=1, retry_after=3, error_rate=1.0)
    assert sum(state.statuses.values()) == 2
