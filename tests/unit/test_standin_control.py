"""The stand-ins' control endpoints over loopback (`/_standin/{dest}/...`): what tests and `demo` read
back. A soak's stand-in holds millions of items, so `received` can answer with the keys only or with
the items under some key prefixes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.standin_helpers import serve_app
from worker.standins.app import make_app
from worker.standins.server import credentials_from

CREDENTIALS = credentials_from({})
AUTH = {"X-Reteno-Access-Key": CREDENTIALS["reteno"]}
EVENT = {"eventTypeKey": "Order Completed", "params": [{"name": "externalCustomerId", "value": "user-1"}]}


def run(scenario: Callable[[aiohttp.ClientSession, str], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with serve_app(make_app(CREDENTIALS)) as base, aiohttp.ClientSession() as session:
            return await scenario(session, base)

    return asyncio.run(main())


async def fill(session: aiohttp.ClientSession, base: str) -> None:
    """Two events, a contact upsert, another event and a device upsert, in that order."""
    posts = [
        ("/api/v2/event", {**EVENT, "keyValue": "msg-2"}),
        ("/api/v2/event", {**EVENT, "keyValue": "msg-1"}),
        ("/api/v1/contact", {"externalCustomerId": "user-1", "channels": [{"type": "email", "value": "a@x.io"}]}),
        ("/api/v2/event", {**EVENT, "keyValue": "msg-3"}),
        ("/api/v1/device", {"deviceId": "dev-1", "externalUserId": "user-1", "category": "MOBILE"}),
    ]
    for path, body in posts:
        async with session.post(base + path, json=body, headers=AUTH) as response:
            assert response.status < 300, (path, response.status, await response.text())


async def received(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json() if response.status == 200 else await response.text()


def test_received_in_arrival_order_whole_as_keys_and_by_prefix():
    async def scenario(session, base):
        await fill(session, base)
        control = f"{base}/_standin/reteno/received"
        return [
            await received(session, control),
            await received(session, control + "?keys"),
            await received(session, control + "?prefix=contact:"),
            await received(session, control + "?prefix=contact:&prefix=device:"),
            await received(session, control + "?prefix=nothing-has-this"),
        ]

    whole, keys, contacts, upserts, none = run(scenario)
    assert whole[0] == 200 and list(whole[1]) == ["msg-2", "msg-1", "contact:user-1", "msg-3", "device:dev-1:user-1"]
    assert whole[1]["msg-1"]["keyValue"] == "msg-1"
    assert keys == (200, ["msg-2", "msg-1", "contact:user-1", "msg-3", "device:dev-1:user-1"])
    assert contacts[0] == 200 and list(contacts[1]) == ["contact:user-1"]
    assert contacts[1]["contact:user-1"] == whole[1]["contact:user-1"]
    assert upserts[0] == 200 and list(upserts[1]) == ["contact:user-1", "device:dev-1:user-1"]
    assert none == (200, {})


def test_an_unknown_stand_in_is_404():
    async def scenario(session, base):
        return await received(session, f"{base}/_standin/nowhere/received?keys")

    status, text = run(scenario)
    assert status == 404 and "nowhere" in text
