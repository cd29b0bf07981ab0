"""The "echo" destination's mapping: track events -> `POST /echo/events` in batches of up to 50."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import orjson
from pydantic import SecretStr

from worker.config_loader import Section
from worker.destinations.base import Endpoint, Item, Outcome, Request, Skip, Unmappable, classify_status
from worker.segment.event import SegmentEvent

EVENTS = Endpoint(name="events", method="POST", base="default", path="/echo/events", max_items=50)


class EchoConfig(Section):
    env_prefix: ClassVar[str] = "ECHO_"

    api_key: SecretStr | None = None
    base_url: str = "https://echo.invalid"


class EchoDestination:
    name = "echo"

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.endpoints: Mapping[str, Endpoint] = {EVENTS.name: EVENTS}
        self.base_urls: Mapping[str, str] = {"default": config.base_url}
        self.events_per_second: float | None = None

    def map_event(self, event: SegmentEvent) -> list[Item]:
        if event.get("type") != "track":
            raise Skip(f"{event.get('type')}: echo takes only track")
        if not event.get("event"):
            raise Unmappable("track without an event name")
        user = str(event.get("userId") or event.get("anonymousId") or "")
        payload = {"id": event["messageId"], "user": user, "name": event["event"]}
        return [Item(EVENTS.name, payload, str(event["messageId"]), user)]

    def encode(self, endpoint: Endpoint, items: Sequence[Item]) -> Request:
        key = self.config.api_key.get_secret_value() if self.config.api_key else ""
        headers = {"Content-Type": "application/json", "X-Echo-Key": key}
        return Request(endpoint.method, endpoint.base, endpoint.path, headers, orjson.dumps([i.payload for i in items]))

    def classify(
        self, endpoint: Endpoint, items: Sequence[Item], status: int, body: bytes, headers: Mapping[str, str]
    ) -> Outcome:
        return Outcome(status, classify_status(status, body, headers))


def make(config: EchoConfig) -> EchoDestination:
    return EchoDestination(config)
