"""Helpers for sink integration tests: the stand-in server as a process, its control API, events."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from tests.kafka_helpers import produce, start_role
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.destinations import registry
from worker.kafka.broker import free_port, wait_for_port
from worker.processes import Role
from worker.standins.server import standin_env

DESTINATIONS = registry.names()
# Fast retries so fault tests finish in seconds; generous attempts so nothing is exhausted by accident.
FAST_SINK_ENV = {
    "SINK_LINGER_MS": "20",
    "SINK_BACKOFF_INITIAL": "0.05",
    "SINK_BACKOFF_MAX": "0.5",
    "SINK_MAX_ATTEMPTS": "200",
    "SINK_REQUEST_TIMEOUT": "0.5",
    "AMPLITUDE_EVENTS_PER_SECOND": "1000000",
    "BREVO_EVENTS_PER_SECOND": "1000000",
    "RETENO_EVENTS_PER_SECOND": "1000000",
}


class Standins:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.role = Role(["standins", "--port", str(self.port)], {}, log_dir / "standins.log")
        wait_for_port("127.0.0.1", self.port, 15)

    def env(self) -> dict[str, str]:
        """What a sink needs to talk to these stand-ins."""
        return standin_env(self.base)

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return orjson.loads(response.read())

    def reset_all(self) -> None:
        for destination in DESTINATIONS:
            self._call("POST", f"/_standin/{destination}/reset", {})

    def faults(self, destination: str, **faults: Any) -> None:
        self._call("POST", f"/_standin/{destination}/faults", faults)

    def received(self, destination: str, prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
        """Every accepted item by dedupe id, or only those whose id starts with one of `prefixes`."""
        query = "&".join(f"prefix={quote(prefix)}" for prefix in prefixes)
        # A soak's stand-in holds millions of items and is busy with the other sinks' drains.
        return self._call("GET", f"/_standin/{destination}/received" + (f"?{query}" if query else ""), timeout=120)

    def received_keys(self, destination: str) -> list[str]:
        """The accepted items' dedupe ids, in arrival order."""
        return self._call("GET", f"/_standin/{destination}/received?keys", timeout=120)

    def stats(self, destination: str) -> dict[str, Any]:
        return self._call("GET", f"/_standin/{destination}/stats")

    def wait_received(self, destination: str, count: int, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        received = self.received(destination)
        while len(received) < count and time.monotonic() < deadline:
            time.sleep(0.2)
            received = self.received(destination)
        return received

    def stop(self) -> None:
        self.role.terminate()


def track_events(count: int, users: int = 10, prefix: str = "m") -> list[dict[str, Any]]:
    """Normalised track events, as the normaliser would write them."""
    events = []
    for i in range(count):
        user = f"user-{i % users:03d}"
        events.append(
            {
                "type": "track",
                "messageId": f"{prefix}{i:05d}",
                "userId": user,
                "anonymousId": f"anon-{user}",
                "event": "Order Completed",
                "timestamp": "2026-11-22T10:00:00.000Z",
                "originalTimestamp": "2026-11-22T10:00:00.000Z",
                "receivedAt": "2026-11-22T10:00:01.000Z",
                "properties": {"value": 2, "revenue": 9.5, "plan": "pro"},
                "traits": {"email": f"{user}@example.com"},
                "context": {"ip": "81.2.69.142", "device": {"id": f"dev-{user}", "type": "ios"}},
                "integrations": {},
            }
        )
    return events


def write_events(settings: Config, destination: str, events: list[dict[str, Any]]) -> None:
    codec = EventCodec()
    produce(settings, f"dest.{destination}", [(e["userId"], codec.encode(e)) for e in events])


def start_sink(settings: Config, destination: str, standins: Standins, log_dir: Path, **env: str) -> Role:
    return start_role(settings, ["sink", destination], log_dir, **{**FAST_SINK_ENV, **standins.env(), **env})


def metric_value(port: int, name: str) -> float | None:
    """A gauge or counter without labels from a role's /metrics, or None while it is not served."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def assigned_partitions(log: Path) -> set[int]:
    """The partitions a sink process holds at the end of its log (its assign and revoke lines)."""
    held: set[int] = set()
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        parts = {int(p.rsplit("[", 1)[1].rstrip("]")) for p in record.get("partitions", [])}
        if record.get("event") == "partitions assigned":
            held |= parts
        elif record.get("event") in ("partitions revoked", "partitions lost"):
            held -= parts
    return held


def log_has(log: Path, event: str) -> bool:
    return any(f'"event": "{event}"' in line or f'"event":"{event}"' in line for line in log.read_text().splitlines())


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)
