"""The public commands, run as a user would run them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest

from tests.kafka_helpers import produce, role_env, settings_for
from worker.avro_codec import EventCodec
from worker.kafka.admin import partition_counts
from worker.kafka.broker import free_port, wait_for_port

pytestmark = pytest.mark.integration


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_topics_create_is_idempotent(broker, prefix):
    settings = settings_for(broker, prefix)
    env = {**role_env(settings), "TOPIC_PARTITIONS": "5"}
    first = run(["topics", "create"], env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == 11 and "exists" not in first.stdout
    again = run(["topics", "create"], env)
    assert again.returncode == 0 and again.stdout.count("exists") == 11
    counts = partition_counts(settings.kafka.admin())
    assert counts[f"{prefix}raw"] == 5 and counts[f"{prefix}identities"] == 5


def test_tail_prints_decoded_avro_with_key_partition_offset_and_headers(broker, prefix):
    settings = settings_for(broker, prefix)
    assert run(["topics", "create"], role_env(settings)).returncode == 0
    event = {
        "type": "track",
        "messageId": "m1",
        "anonymousId": "a1",
        "userId": "u1",
        "event": "E",
        "timestamp": "2026-11-22T10:00:00.000Z",
        "originalTimestamp": "2026-11-22T10:00:00.000Z",
        "receivedAt": "2026-11-22T10:00:00.000Z",
        "properties": {"x": 1},
        "traits": {},
        "context": {},
        "integrations": {},
    }
    produce(settings, "dest.amplitude", [("u1", EventCodec().encode(event))])
    produce(settings, "dlq.raw", [("k", b"not json at all \xff")])
    out = run(["tail", "dest.amplitude", "--from-beginning", "-n", "1"], role_env(settings))
    assert out.returncode == 0, out.stderr
    line = orjson.loads(out.stdout.splitlines()[0])
    assert line["key"] == "u1" and line["offset"] == 0 and line["topic"] == f"{prefix}dest.amplitude"
    assert line["value"]["event"] == "E" and line["value"]["properties"] == {"x": 1}
    raw = run(["tail", f"{prefix}dlq.raw", "--from-beginning", "-n", "1"], role_env(settings))
    assert "base64" in orjson.loads(raw.stdout.splitlines()[0])["value"]


def test_broker_command_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, 15)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_demo_runs_to_a_clean_summary():
    out = run(["demo"], {}, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all sample events accounted for" in out.stdout
    assert "segment.dlq.raw: 3/3 poison messages dead-lettered" in out.stdout


@pytest.mark.parametrize("role", [["sink", "amplitude"], ["normalize"]], ids=["sink", "normalize"])
def test_a_role_whose_topics_are_missing_refuses_to_start_naming_them(broker, prefix, role):
    # Before: a sink without its dead-letter topic ran until its first poison event, then exited on
    # the failed write, and again after every restart. Now it refuses at start, in one line.
    settings = settings_for(broker, prefix)
    env = role_env(settings, AMPLITUDE_API_KEY="k" * 32)
    result = run(role, env, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    missing_line = [line for line in result.stderr.splitlines() if "not on the broker" in line]
    assert len(missing_line) == 1, result.stderr[-2000:]
    assert f"{prefix}dlq." in missing_line[0] and "segment-worker topics create" in missing_line[0]
