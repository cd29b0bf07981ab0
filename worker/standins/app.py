"""The stand-in destinations as one aiohttp app: `segment-worker standins` and tests run it."""

from __future__ import annotations

from aiohttp import web

from worker.destinations import registry
from worker.standins.faults import Faults, StandinState

STATE_KEY: web.AppKey[dict[str, StandinState]] = web.AppKey("standin_state", dict)


def make_app(credentials: dict[str, str]) -> web.Application:
    """A stand-in for every registered destination; `credentials` maps its name -> the key it accepts."""
    app = web.Application(client_max_size=20 * 1024 * 1024)
    states = {entry.name: StandinState(entry.name) for entry in registry.entries()}
    app[STATE_KEY] = states
    for entry in registry.entries():
        entry.standin_module().register(app, states[entry.name], credentials[entry.name])

    async def set_faults(request: web.Request) -> web.Response:
        state = _state(request)
        try:
            state.set_faults(Faults.from_json(await request.json()))
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(state.summary())

    async def received(request: web.Request) -> web.Response:
        """Dedupe id -> item, in arrival order. `?keys` gives only the ids (a list), `?prefix=P`
        (repeatable) only the items whose id starts with one of them: a soak's stand-in holds
        millions of items, too many to send whole."""
        held = _state(request).received
        if "keys" in request.query:
            return web.json_response(list(held))
        if prefixes := tuple(request.query.getall("prefix", [])):
            held = {key: item for key, item in held.items() if key.startswith(prefixes)}
        return web.json_response(held)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(_state(request).summary())

    async def reset(request: web.Request) -> web.Response:
        _state(request).reset()
        return web.json_response({"reset": True})

    app.router.add_post("/_standin/{dest}/faults", set_faults)
    app.router.add_get("/_standin/{dest}/received", received)
    app.router.add_get("/_standin/{dest}/stats", stats)
    app.router.add_post("/_standin/{dest}/reset", reset)
    return app


def _state(request: web.Request) -> StandinState:
    states = request.app[STATE_KEY]
    dest = request.match_info["dest"]
    if dest not in states:
        raise web.HTTPNotFound(text=f"unknown stand-in {dest!r}")
    return states[dest]
