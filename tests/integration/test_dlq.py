"""Dead letters end to end: a rejecting destination fills the DLQ, inspect explains it, replay repairs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import pytest

from tests.kafka_helpers import read_count, role_env, settings_for, settle, setup_topics, start_role
from tests.sink_helpers import start_sink, track_events, write_events
from worker.dlq.headers import Kind, dead_letter_headers, header_map

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def reset(clean_standins):
    """Every test starts with stand-ins that remember nothing and inject no fault."""


@pytest.fixture
def settings(broker, prefix):
    settings = settings_for(broker, prefix, partitions=3)
    setup_topics(settings)
    return settings


def cli(settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**os.environ, **role_env(settings)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for_dead_letters(settings, destination: str, count: int, timeout: float = 30):
    return read_count(settings, f"dlq.{destination}", count, timeout)


def test_rejected_events_fill_the_dlq_inspect_explains_and_replay_delivers_each_once(settings, standins, tmp_path):
    events = track_events(200)
    rejected = {e["messageId"] for e in events[::5]}
    standins.faults("amplitude", poison_ids=sorted(rejected))
    write_events(settings, "amplitude", events)
    sink = start_sink(settings, "amplitude", standins, tmp_path)
    try:
        assert len(standins.wait_received("amplitude", len(events) - len(rejected))) == 160
        assert len(wait_for_dead_letters(settings, "amplitude", len(rejected))) == 40

        inspected = cli(settings, "dlq", "inspect", "amplitude", "--json")
        assert inspected.returncode == 0, inspected.stderr
        report = orjson.loads(inspected.stdout)
        assert report["total"] == 40 and report["by_kind"] == {"permanent": 40}
        assert sum(report["by_reason"].values()) == 40 and all("HTTP 400" in r for r in report["by_reason"])
        assert len(report["samples"]) == 3 and report["samples"][0]["headers"]["destination"] == "amplitude"
        assert report["oldest"] <= report["newest"]
        human = cli(settings, "dlq", "inspect", "amplitude")
        assert "40 dead letters" in human.stdout and "permanent" in human.stdout

        standins.faults("amplitude")  # the destination is fixed
        dry = cli(settings, "dlq", "replay", "amplitude", "--dry-run")
        assert dry.returncode == 0 and "would replay 40 dead letters" in dry.stdout
        time.sleep(2)
        assert len(standins.received("amplitude")) == 160  # a dry run writes nothing

        replayed = cli(settings, "dlq", "replay", "amplitude")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 40 dead letters" in replayed.stdout
        received = standins.wait_received("amplitude", len(events))
        again = cli(settings, "dlq", "replay", "amplitude")
        assert "replayed 0 dead letters" in again.stdout  # progress was committed
    finally:
        assert sink.terminate() == 0
    assert set(received) == {e["messageId"] for e in events}
    assert standins.stats("amplitude")["duplicates"] == 0


def test_replay_filters_by_reason_and_max(settings, standins, tmp_path):
    events = track_events(30)
    standins.faults("reteno", poison_ids=[e["messageId"] for e in events[:10]])
    write_events(settings, "reteno", events)
    sink = start_sink(settings, "reteno", standins, tmp_path)
    try:
        wait_for_dead_letters(settings, "reteno", 10)
        none = cli(settings, "dlq", "replay", "reteno", "--reason", "no such reason", "--dry-run")
        assert "would replay 0 dead letters (10 did not match the filters)" in none.stdout
        standins.faults("reteno")
        first = cli(settings, "dlq", "replay", "reteno", "--reason", "HTTP 400", "--max", "4")
        assert "replayed 4 dead letters" in first.stdout
        rest = cli(settings, "dlq", "replay", "reteno", "--reason", "http 400")  # case-insensitive, same filter
        assert "replayed 6 dead letters" in rest.stdout
        received = standins.wait_received("reteno", len(events))
    finally:
        assert sink.terminate() == 0
    assert set(received) == {e["messageId"] for e in events}


def test_replay_killed_halfway_and_rerun_loses_nothing(settings, standins, tmp_path):
    events = track_events(600)
    standins.faults("amberflo", down=True)
    write_events(settings, "amberflo", events)
    # Attempts count only while the destination is up for others; here it never is, so the circuit
    # must not open for the budget to be spent at once.
    sink = start_sink(
        settings, "amberflo", standins, tmp_path, SINK_MAX_ATTEMPTS="1", SINK_CIRCUIT_OPEN_AFTER="1000000"
    )
    try:
        letters = wait_for_dead_letters(settings, "amberflo", len(events), timeout=60)
        assert {header_map(m.headers())["error_kind"] for m in letters} == {"exhausted"}
        standins.faults("amberflo")  # the outage is over
        slow = start_role(settings, ["dlq", "replay", "amberflo", "--rate", "200"], tmp_path)
        standins.wait_received("amberflo", 50, timeout=30)
        slow.kill()  # kill -9, mid-replay
        assert len(standins.received("amberflo")) < len(events), "replay finished before the kill"
        rerun = cli(settings, "dlq", "replay", "amberflo")
        assert rerun.returncode == 0, rerun.stderr
        received = standins.wait_received("amberflo", len(events), timeout=60)
    finally:
        assert sink.terminate() == 0
    assert set(received) == {e["messageId"] for e in events}


def test_raw_dead_letters_go_back_to_the_raw_topic_for_the_normaliser(settings):
    original = b'{"type": "track", "userId": "u1", "event": "Fixed"}'
    headers = dead_letter_headers(
        error="malformed JSON: ...",
        kind=Kind.INVALID,
        original_topic=settings.names.raw,
        original_partition=0,
        original_offset=7,
        destination="raw",
    )
    producer = settings.kafka.producer()
    producer.produce(settings.names.dlq("raw"), original, "u1", headers=headers)
    assert producer.flush(10) == 0
    out = cli(settings, "dlq", "replay", "raw")
    assert "replayed 1 dead letters" in out.stdout and settings.names.raw in out.stdout
    (message,) = settle(settings, "raw", timeout=2)
    assert message.value() == original and message.key() == b"u1"
    assert header_map(message.headers())["replayed_from"].startswith(settings.names.dlq("raw"))
