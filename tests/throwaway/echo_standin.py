"""The "echo" destination's stand-in: checks the key, dedupes by id, records what it accepted."""

from __future__ import annotations

import orjson
from aiohttp import web

from worker.standins.faults import StandinState


def register(app: web.Application, state: StandinState, api_key: str) -> None:
    async def events(request: web.Request) -> web.Response:
        failure = await state.injected_failure()
        if failure is not None:
            status, body, headers = failure
        elif request.headers.get("X-Echo-Key") != api_key:
            status, body, headers = 401, {"error": "bad key"}, {}
        else:
            for item in orjson.loads(await request.read()):
                state.accept(item["id"], item)
            status, body, headers = 200, {"ok": True}, {}
        state.statuses[status] += 1
        return web.json_response(body, status=status, headers=headers)

    app.router.add_post("/echo/events", events)
