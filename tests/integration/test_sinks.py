"""Each sink as a real process: real broker, real HTTP to the stand-in destinations, injected faults."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from tests.kafka_helpers import crash_test_variables, read, read_count, settings_for, settle, setup_topics
from tests.sink_helpers import DESTINATIONS, start_sink, track_events, write_events
from worker.avro_codec import EventCodec
from worker.destinations import registry
from worker.dlq.headers import header_map
from worker.kafka.broker import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(broker, prefix):
    settings = settings_for(broker, prefix, partitions=3)
    setup_topics(settings)
    return settings


@pytest.fixture(autouse=True)
def reset(clean_standins):
    """Every test starts with stand-ins that remember nothing and inject no fault."""


def probe(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.read().decode()
    except urllib.error.HTTPError as error:
        return error.read().decode()
    except OSError:
        return ""


def message_ids(events) -> set[str]:
    return {e["messageId"] for e in events}


def _by_message_id(messages) -> dict[str, dict[str, str]]:
    codec = EventCodec()
    return {codec.decode(m.value())[0]["messageId"]: header_map(m.headers()) for m in messages}


def dead_letter_ids(settings, destination, timeout=2.0) -> dict[str, dict[str, str]]:
    """Every dead letter once the topic has been quiet for `timeout` (to see that none arrive)."""
    return _by_message_id(settle(settings, f"dlq.{destination}", timeout))


def wait_dead_letter_ids(settings, destination, count, timeout=30.0) -> dict[str, dict[str, str]]:
    """Dead letters as soon as `count` have arrived (or the timeout passed)."""
    return _by_message_id(read_count(settings, f"dlq.{destination}", count, timeout))


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_exactly_once_under_5xx_and_timeouts(settings, standins, destination, tmp_path):
    events = track_events(300)
    standins.faults(destination, error_rate=0.2, timeout_rate=0.05, timeout_seconds=1.0, seed=7)
    write_events(settings, destination, events)
    sink = start_sink(settings, destination, standins, tmp_path)
    try:
        received = standins.wait_received(destination, len(events))
    finally:
        assert sink.terminate() == 0
    assert set(received) == message_ids(events)
    statuses = standins.stats(destination)["statuses"]
    assert any(code.startswith("5") for code in statuses), statuses  # the faults really happened
    assert dead_letter_ids(settings, destination) == {}


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_exactly_once_through_a_429_storm_honouring_retry_after(settings, standins, destination, tmp_path):
    events = track_events(200)
    standins.faults(destination, throttle_requests=15, retry_after=0.3)
    write_events(settings, destination, events)
    sink = start_sink(settings, destination, standins, tmp_path)
    started = time.monotonic()
    try:
        received = standins.wait_received(destination, len(events))
    finally:
        assert sink.terminate() == 0
    assert set(received) == message_ids(events)
    assert standins.stats(destination)["statuses"].get("429") == 15
    assert time.monotonic() - started > 0.3  # it did wait as told
    assert dead_letter_ids(settings, destination) == {}


def slow(destination: str, events_per_second: int = 300) -> tuple[dict[str, str], dict[str, float]]:
    """Settings and stand-in faults that keep a sink busy for seconds, so a test can stop it
    mid-way: its rate limit lowered where it has one, else one request at a time to an API that
    answers each request 0.3 s late."""
    config = registry.get(destination).config
    if "events_per_second" in config.model_fields:
        return {config.variable("events_per_second"): str(events_per_second)}, {}
    return {"SINK_CONCURRENCY": "1"}, {"latency_seconds": 0.3}


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_kill_9_mid_batch_then_restart_delivers_everything(broker, settings, standins, destination, tmp_path):
    slow_settings, slow_api = slow(destination)
    crash = {**crash_test_variables(broker), **slow_settings}
    events = track_events(1500)
    # Slow enough to be caught mid-way, and a 10% error rate's retries.
    standins.faults(destination, error_rate=0.1, seed=3, **slow_api)
    write_events(settings, destination, events)
    first = start_sink(settings, destination, standins, tmp_path, **crash)
    standins.wait_received(destination, 100)
    first.kill()
    assert len(standins.received(destination)) < len(events), "finished before the kill; nothing tested"
    second = start_sink(settings, destination, standins, tmp_path, **crash)
    try:
        received = standins.wait_received(destination, len(events), timeout=90)
    finally:
        assert second.terminate() == 0
    assert set(received) == message_ids(events)


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_one_poison_event_per_batch_is_the_only_dead_letter(settings, standins, destination, tmp_path):
    events = track_events(400)
    poison = {e["messageId"] for e in events[25::50]}  # one in every 50
    standins.faults(destination, poison_ids=sorted(poison))
    write_events(settings, destination, events)
    sink = start_sink(settings, destination, standins, tmp_path)
    try:
        received = standins.wait_received(destination, len(events) - len(poison))
        dead = wait_dead_letter_ids(settings, destination, len(poison))
    finally:
        assert sink.terminate() == 0
    assert set(received) == message_ids(events) - poison
    assert set(dead) == poison
    for headers in dead.values():
        assert headers["error_kind"] == "permanent" and headers["destination"] == destination
        assert headers["http_status"] == "400" and headers["error"]
        assert headers["original_topic"] == settings.names.dest(destination)


def test_a_throttled_amplitude_user_delays_only_itself(settings, standins, tmp_path):
    events = track_events(200, users=5)
    slow_user = "user-003"
    standins.faults("amplitude", throttled_users=[slow_user], retry_after=1.0)
    write_events(settings, "amplitude", events)
    sink = start_sink(settings, "amplitude", standins, tmp_path)
    try:
        others = {e["messageId"] for e in events if e["userId"] != slow_user}
        received = standins.wait_received("amplitude", len(others), timeout=30)
        assert set(received) == others  # everyone else got through while the user was throttled
        standins.faults("amplitude")  # the throttling ends
        received = standins.wait_received("amplitude", len(events), timeout=30)
    finally:
        assert sink.terminate() == 0
    assert set(received) == message_ids(events)
    assert dead_letter_ids(settings, "amplitude") == {}


def test_graceful_stop_commits_so_a_restart_resends_nothing(settings, standins, tmp_path):
    events = track_events(300)
    write_events(settings, "amberflo", events)
    sink = start_sink(settings, "amberflo", standins, tmp_path)
    standins.wait_received("amberflo", len(events))
    time.sleep(1.5)  # one auto-commit interval
    assert sink.terminate() == 0
    requests_before = standins.stats("amberflo")["requests"]
    again = start_sink(settings, "amberflo", standins, tmp_path)
    time.sleep(4)
    assert again.terminate() == 0
    assert standins.stats("amberflo")["requests"] == requests_before
    assert read(settings, "dlq.amberflo", lambda seen: False, timeout=1) == []


def test_an_item_that_keeps_failing_exhausts_its_retry_budget_into_the_dlq(settings, standins, tmp_path):
    events = track_events(20)
    standins.faults("amberflo", down=True)
    write_events(settings, "amberflo", events)
    # The circuit never opens here, so every failure is charged to the items, as when a destination
    # fails these requests while it works for others.
    sink = start_sink(
        settings, "amberflo", standins, tmp_path, SINK_MAX_ATTEMPTS="3", SINK_CIRCUIT_OPEN_AFTER="1000000"
    )
    try:
        dead = wait_dead_letter_ids(settings, "amberflo", len(events))
    finally:
        assert sink.terminate() == 0
    assert set(dead) == message_ids(events)
    for headers in dead.values():
        assert headers["error_kind"] == "exhausted" and headers["attempts"] == "3"
        assert headers["http_status"] == "503" and "gave up after 3 attempts" in headers["error"]
    assert standins.received("amberflo") == {}


def test_an_outage_opens_the_circuit_and_pauses_instead_of_dead_lettering(settings, standins, tmp_path):
    events = track_events(300)
    standins.faults("amberflo", down=True)
    write_events(settings, "amberflo", events)
    port = free_port()
    # Six attempts at 0.05-0.5 s backoff are spent in a few seconds, were outage failures charged; at
    # most circuit_open_after (5) - 1 are charged before the circuit opens.
    sink = start_sink(settings, "amberflo", standins, tmp_path, SINK_MAX_ATTEMPTS="6", METRICS_PORT=str(port))
    try:
        deadline = time.monotonic() + 20
        readiness = ""
        while "failing" not in readiness and time.monotonic() < deadline:
            readiness = probe(port, "/readyz")
            time.sleep(0.1)
        assert "not ready: amberflo failing" in readiness  # /readyz says the destination is down
        time.sleep(3)  # many retries later ...
        assert dead_letter_ids(settings, "amberflo", timeout=1) == {}  # ... nothing was dead-lettered
        standins.faults("amberflo")  # the destination is back
        received = standins.wait_received("amberflo", len(events), timeout=60)
        deadline = time.monotonic() + 10
        while probe(port, "/readyz").startswith("not ready") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert probe(port, "/readyz").startswith("ready")
    finally:
        assert sink.terminate() == 0
    assert set(received) == message_ids(events)
    assert dead_letter_ids(settings, "amberflo", timeout=1) == {}


def test_sigterm_mid_stream_then_restart_loses_nothing(settings, standins, tmp_path):
    events = track_events(3000)
    standins.faults("amplitude", error_rate=0.5, seed=11)
    write_events(settings, "amplitude", events)
    first = start_sink(settings, "amplitude", standins, tmp_path, **slow("amplitude")[0])
    standins.wait_received("amplitude", 100)
    assert first.terminate() == 0  # drains what it can within its grace, commits, leaves the group
    assert len(standins.received("amplitude")) < len(events), "finished before the stop; nothing tested"
    second = start_sink(settings, "amplitude", standins, tmp_path)
    try:
        received = standins.wait_received("amplitude", len(events), timeout=90)
    finally:
        assert second.terminate() == 0
    assert set(received) == message_ids(events)


def test_a_second_sink_joins_mid_stream_and_nothing_is_lost(settings, standins, tmp_path):
    events = track_events(6000, users=60)
    standins.faults("reteno", error_rate=0.4, seed=5)
    write_events(settings, "reteno", events)
    # One request at a time (Reteno takes one item a request), so the first sink is still busy when
    # the second has joined, on a broker that rebalances in well under a second too.
    slow = {"SINK_CONCURRENCY": "1"}
    first = start_sink(settings, "reteno", standins, tmp_path, **slow)
    second = None
    try:
        standins.wait_received("reteno", 200)
        second = start_sink(settings, "reteno", standins, tmp_path, **slow)
        deadline = time.monotonic() + 30
        while "partitions assigned" not in second.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(standins.received("reteno")) < len(events), "the first sink finished alone; nothing tested"
        received = standins.wait_received("reteno", len(events), timeout=120)
    finally:
        assert first.terminate() == 0
        if second is not None:
            assert second.terminate() == 0
    assert set(received) == message_ids(events)
    assert "partitions revoked" in first.log_path.read_text()
    assert "partitions assigned" in second.log_path.read_text()


def test_a_wrong_api_key_is_retried_then_dead_lettered_and_never_written_out(settings, standins, tmp_path):
    events = track_events(5)
    wrong_key = "wrong-key-0123456789abcdef"
    write_events(settings, "amplitude", events)
    # The circuit kept closed: a refused key opens it (the sink then pauses instead of spending
    # the items' attempts, tested in test_sink_storms.py); here each item's 2 attempts are spent.
    sink = start_sink(
        settings,
        "amplitude",
        standins,
        tmp_path,
        AMPLITUDE_API_KEY=wrong_key,
        SINK_MAX_ATTEMPTS="2",
        SINK_CIRCUIT_OPEN_AFTER="1000",
    )
    try:
        dead = wait_dead_letter_ids(settings, "amplitude", len(events))
    finally:
        assert sink.terminate() == 0
    assert set(dead) == message_ids(events)
    for headers in dead.values():
        assert headers["error_kind"] == "exhausted" and "Invalid API key" in headers["error"]
        assert wrong_key not in headers["error"] and "***" in headers["error"]
    assert wrong_key not in sink.log_path.read_text()
