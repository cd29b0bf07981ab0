"""The collector as a real process (`segment-worker collect`) on the real embedded broker,
driven by the official Segment SDK (segment-analytics-python) and by raw HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests
from segment import analytics
from segment.analytics.request import APIError

from tests.kafka_helpers import read_count, role_env, settings_for, settle, setup_topics
from worker.config import Config
from worker.kafka.broker import EmbeddedBroker, free_port
from worker.processes import Role

pytestmark = pytest.mark.integration

KEY = "wk_integration"


class CollectorProcess:
    """`segment-worker collect` on a free loopback port, stopped by its PID."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.role = Role(["collect", "--host", "127.0.0.1", "--port", str(self.port)], env, log_path)
        self._wait_until_serving()

    def _wait_until_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.role.alive(), self.log_path.read_text()
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError(f"collector did not serve in {timeout}s: {self.log_path.read_text()}")

    def terminate(self, timeout: float = 30.0) -> int:
        return self.role.terminate(timeout)


@pytest.fixture
def settings(broker: EmbeddedBroker, prefix: str) -> Config:
    settings = settings_for(broker, prefix, partitions=2)
    setup_topics(settings)
    return settings


@pytest.fixture
def collector(settings: Config, tmp_path: Path) -> Iterator[CollectorProcess]:
    running = CollectorProcess(role_env(settings, COLLECTOR_WRITE_KEYS=f"another-key,{KEY}"), tmp_path / "collect.log")
    try:
        yield running
    finally:
        assert running.terminate() == 0, running.log_path.read_text()


def sdk_client(collector: CollectorProcess, write_key: str = KEY, **options: object) -> analytics.Client:
    return analytics.Client(write_key=write_key, host=collector.url, sync_mode=True, max_retries=0, **options)


def test_segment_sdk_events_land_on_raw_with_server_stamps(collector: CollectorProcess, settings: Config) -> None:
    client = sdk_client(collector)
    sent = [
        client.identify("user-1", {"email": "ada@example.com", "plan": "pro"}),
        client.track("user-1", "Order Completed", {"revenue": 42.5, "currency": "EUR"}),
        client.page("user-1", "Docs", "Getting Started", {"url": "https://example.com/docs"}),
        client.screen("user-1", "App", "Home"),
        client.group("user-1", "org-7", {"name": "Acme"}),
        client.alias("anon-99", "user-1"),
    ]
    assert all(ok for ok, _msg in sent)
    sent_ids = {msg["type"]: msg["messageId"] for _ok, msg in sent}

    messages = read_count(settings, "raw", len(sent), timeout=30)
    assert len(messages) == len(sent)
    received: dict[str, dict] = {}
    for message in messages:
        envelope = orjson.loads(message.value())
        assert envelope.keys() == {"batch"}  # one event a message, the batch's fields merged into it
        [event] = envelope["batch"]
        assert "writeKey" not in event  # the SDK puts the key in the body too; it is not stored
        assert event["sentAt"]  # the SDK's batch-level sentAt is kept for skew correction
        assert message.key() == b"user-1"
        assert event["receivedAt"].endswith("Z") and len(event["receivedAt"]) == len("2024-01-01T00:00:00.000Z")
        assert event["context"]["ip"] == "127.0.0.1"
        assert event["context"]["library"]["name"] == "analytics-python"
        received[event["type"]] = event
    assert {t: e["messageId"] for t, e in received.items()} == sent_ids
    assert received["track"]["event"] == "Order Completed"
    assert received["identify"]["traits"]["email"] == "ada@example.com"
    assert received["group"]["groupId"] == "org-7"
    assert received["alias"]["previousId"] == "anon-99"

    # The SDK's gzip mode goes through the same path.
    assert sdk_client(collector, gzip=True).track("user-1", "Zipped")[0]
    zipped = read_count(settings, "raw", len(sent) + 1, timeout=30)
    assert any(orjson.loads(m.value())["batch"][0].get("event") == "Zipped" for m in zipped)


def test_refused_requests_write_nothing(collector: CollectorProcess, settings: Config) -> None:
    # Wrong key, through the SDK: it reads our error body's `code` and `message`.
    with pytest.raises(APIError) as refused:
        sdk_client(collector, write_key="not-a-key").track("user-1", "Nope")
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")

    oversized = requests.post(
        f"{collector.url}/v1/track",
        json={"userId": "user-1", "event": "Big", "properties": {"blob": "x" * 40_000}},
        auth=(KEY, ""),
    )
    assert oversized.status_code == 400
    assert oversized.json()["success"] is False
    assert oversized.json()["code"] == "payload_too_large"
    assert oversized.json()["message"].startswith("Exceed payload limit")

    malformed = requests.post(f"{collector.url}/v1/batch", data=b'{"batch": [', auth=(KEY, ""))
    assert malformed.status_code == 400
    assert malformed.json()["code"] == "invalid_json"

    half_bad_batch = {"batch": [{"type": "track", "userId": "u", "event": "ok"}, "not an event"]}
    assert requests.post(f"{collector.url}/v1/batch", json=half_bad_batch, auth=(KEY, "")).status_code == 400

    assert settle(settings, "raw", timeout=3) == []


def test_unreachable_broker_gets_503_not_200(broker: EmbeddedBroker, prefix: str, tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens here
    unreachable = settings_for(broker, prefix, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port}")
    env = role_env(unreachable, COLLECTOR_WRITE_KEYS=KEY, COLLECTOR_ACK_TIMEOUT_SECONDS="2")
    collector = CollectorProcess(env, tmp_path / "collect-unreachable.log")
    try:
        started = time.monotonic()
        answer = requests.post(
            f"{collector.url}/v1/track", json={"userId": "u", "event": "Lost?"}, auth=(KEY, ""), timeout=30
        )
        waited = time.monotonic() - started
        assert answer.status_code == 503
        assert answer.json()["code"] == "unavailable"
        assert 1.5 < waited < 15
        # A page's analytics.js must be able to read the 503 (else it sees a network error).
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert requests.get(f"{collector.url}/readyz", timeout=10).status_code == 503
        with pytest.raises(APIError) as refused:  # and the SDK sees a retryable status
            sdk_client(collector).track("u", "Lost?")
        assert refused.value.status == 503
    finally:
        assert collector.terminate() == 0, collector.log_path.read_text()
