"""Stand-ins served on a free loopback port, for the stand-in unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from worker.standins.faults import StandinState

Register = Callable[[web.Application, StandinState, str], None]


@asynccontextmanager
async def serve_standin(register: Register, state: StandinState, api_key: str) -> AsyncIterator[str]:
    """Yields the stand-in's base URL. The body limit is make_app's, so the stand-in's own 413 answers."""
    app = web.Application(client_max_size=20 * 1024 * 1024)
    register(app, state, api_key)
    async with serve_app(app) as base:
        yield base


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
