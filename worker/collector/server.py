"""Running the collector: `serve_forever` for `segment-worker collect`, `CollectorThread` to embed it
(tests, demo). Shutdown order matters: stop listening, let in-flight requests get their broker
acknowledgement (the poll thread still runs), then flush the producer and stop its thread."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from worker import logs
from worker.collector.app import COLLECTOR, make_app, make_runner
from worker.collector.settings import CollectorSettings
from worker.collector.writer import RawWriter
from worker.config import Config
from worker.config_loader import ConfigError

log = logs.get(__name__)


async def run(
    config: Config,
    collector_settings: CollectorSettings,
    host: str,
    port: int,
    stop: asyncio.Event,
    on_listening: Callable[[int], None] | None = None,
) -> int:
    """Serve until `stop` is set. Returns how many messages were still unflushed at the end."""
    writer = RawWriter(config.kafka, config.names.raw, collector_settings.ack_timeout_seconds)
    writer.start()
    app = make_app(collector_settings, writer)
    runner = make_runner(app, collector_settings)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_port = runner.addresses[0][1]
        log.info("collector listening", host=host, port=bound_port, topic=writer.topic)
        if on_listening is not None:
            on_listening(bound_port)
        await stop.wait()
        log.info("collector stopping")
    finally:
        app[COLLECTOR].accepting = False
        await runner.cleanup()  # stops listening, then waits (shutdown_timeout) for requests in flight
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(None, writer.close, collector_settings.shutdown_timeout_seconds)
    if remaining:
        log.warning("messages left unflushed at shutdown; their requests were not answered 200", count=remaining)
    return remaining


def checked_settings(config: Config) -> CollectorSettings:
    """The collector's settings, refusing to start without a write key (every request would get 401:
    better to say so at once than to look healthy)."""
    collector_settings = config.collector()
    if not collector_settings.write_keys:
        raise ConfigError(f"{CollectorSettings.variable('write_keys')} is empty; the collector needs a write key")
    return collector_settings


def serve_forever(config: Config, collector_settings: CollectorSettings, host: str, port: int) -> None:
    """`segment-worker collect`: serve until SIGTERM/SIGINT, flush the producer, return (exit 0)."""
    asyncio.run(_serve_until_signalled(config, collector_settings, host, port))


async def _serve_until_signalled(config: Config, collector_settings: CollectorSettings, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run(config, collector_settings, host, port, stop)


class CollectorThread:
    """The collector on a background thread with its own event loop, on `port` (0: any free one).

    with CollectorThread(config, CollectorSettings(write_keys=["k"])) as collector:
        requests.post(f"{collector.url}/v1/track", ...)
    """

    def __init__(
        self, config: Config, collector_settings: CollectorSettings, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config
        self.collector_settings = collector_settings
        self.host = host
        self.port = port
        self._listening = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="collector", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> CollectorThread:
        self._thread.start()
        if not self._listening.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"collector did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); a thread has nowhere else to raise
            self._error = exc
            self._listening.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        def listening(port: int) -> None:
            self.port = port
            self._listening.set()

        await run(self.config, self.collector_settings, self.host, self.port, self._stop, listening)

    def __enter__(self) -> CollectorThread:
        return self.start()

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _traceback: TracebackType | None
    ) -> None:
        self.stop()
