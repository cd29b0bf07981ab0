"""A fifth destination takes one mapping module, one stand-in module and one registry entry.

The throwaway "echo" destination (tests/throwaway/) is registered here and nowhere else; settings
validation, the CLI, the topic specs, the stand-ins server, the stand-in environment and the sink
itself must all pick it up, end to end on the real broker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from aiohttp import web
from click.testing import CliRunner

from tests.kafka_helpers import settings_for, setup_topics
from tests.sink_helpers import track_events, write_events
from tests.throwaway import echo_destination
from worker.cli import cli
from worker.config import Config, Settings
from worker.config_loader import ConfigError
from worker.destinations import registry
from worker.kafka.broker import free_port
from worker.sink.strategy import build
from worker.standins.app import STATE_KEY, make_app
from worker.standins.server import credentials_from, default_key, standin_env
from worker.topics import topic_specs

pytestmark = pytest.mark.integration

ENTRY = registry.DestinationEntry(
    "echo", echo_destination.EchoConfig, echo_destination.make, "tests.throwaway.echo_standin"
)


@pytest.fixture
def echo() -> Iterator[registry.DestinationEntry]:
    registry.register(ENTRY)
    try:
        yield ENTRY
    finally:
        registry.unregister(ENTRY.name)


class StandinsThread:
    """The stand-ins app (every registered destination) on its own loop and thread."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.port = free_port()
        self.app = make_app(credentials_from(sources))
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.app)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> StandinsThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def received(self, name: str) -> dict[str, object]:
        return dict(self.app[STATE_KEY][name].received)


def test_settings_cli_and_topics_know_the_new_destination(echo, prefix) -> None:
    assert Settings.from_sources({"DESTINATIONS": "amplitude,echo"}).destinations == ["amplitude", "echo"]
    config = Config.from_sources({"TOPIC_PREFIX": prefix})
    names = {spec.name for spec in topic_specs(config)}
    assert {f"{prefix}dest.echo", f"{prefix}dlq.echo"} <= names
    env = standin_env("http://127.0.0.1:1")
    assert (env["ECHO_BASE_URL"], env["ECHO_API_KEY"]) == ("http://127.0.0.1:1", default_key("echo"))
    with pytest.raises(ConfigError, match="ECHO_API_KEY is not set"):
        config.destination("echo")
    # The CLI's choices come from the registry: `sink echo` is parsed, then refused for its missing key.
    result = CliRunner().invoke(cli, ["sink", "echo"], env={"ECHO_API_KEY": ""})
    assert result.exit_code == 2 and "ECHO_API_KEY is not set" in result.output
    assert CliRunner().invoke(cli, ["dlq", "inspect", "--help"]).exit_code == 0
    registry.unregister("echo")
    assert CliRunner().invoke(cli, ["sink", "echo"]).exit_code == 2  # a usage error once it is gone
    registry.register(ENTRY)


def test_the_new_destinations_sink_delivers_to_its_standin(echo, broker, prefix) -> None:
    with StandinsThread({}) as standins:
        env = {**standin_env(f"http://127.0.0.1:{standins.port}"), "SINK_LINGER_MS": "10"}
        config = settings_for(broker, prefix, partitions=2, **env)
        setup_topics(config)
        events = track_events(40, users=5, prefix="echo")
        write_events(config, "echo", events)
        loop = build(config, "echo")
        deadline = time.monotonic() + 60
        loop.run(until=lambda: len(standins.received("echo")) >= 40 or time.monotonic() > deadline)
        assert set(standins.received("echo")) == {e["messageId"] for e in events}
