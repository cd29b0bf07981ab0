"""`dlq replay raw` of a letter that fails again ends, and so does every re-run.

With the normaliser running, a replayed raw letter that is still invalid is dead-lettered again,
to the very topic the replay reads. A replay that read "until the topic is quiet" re-replayed that
new letter, which failed again, and so on for its whole hour-long timeout. A run must stop at the
ends the topic had when it started, and leave the new letters for the next run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.kafka_helpers import read_count, role_env, settings_for, settle, setup_topics, start_role
from worker.dlq.headers import Kind, dead_letter_headers, header_map

pytestmark = pytest.mark.integration

# Still invalid however often it is replayed: the normaliser dead-letters it with "malformed JSON".
POISON = b'{"type": "track", "userId": "u1", "event": '
RUN_SECONDS = 60  # a run that has not ended by then is looping (the old code ran for its 1 h timeout)


@pytest.fixture
def settings(broker, prefix):
    settings = settings_for(broker, prefix, partitions=3)
    setup_topics(settings)
    return settings


def replay_raw(settings) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker", "dlq", "replay", "raw"],
            env={**os.environ, **role_env(settings)},
            capture_output=True,
            text=True,
            timeout=RUN_SECONDS,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"`dlq replay raw` still running after {RUN_SECONDS}s: it replays its own failures ({expired})")
    return done, time.monotonic() - started


def letters(settings, count: int):
    return read_count(settings, "dlq.raw", count, timeout=30)


def test_replaying_a_letter_that_fails_again_ends_and_so_does_a_rerun(settings, tmp_path):
    headers = dead_letter_headers(
        error="malformed JSON: unexpected end of data",
        kind=Kind.INVALID,
        original_topic=settings.names.raw,
        original_partition=0,
        original_offset=0,
        destination="raw",
    )
    producer = settings.kafka.producer()
    producer.produce(settings.names.dlq("raw"), POISON, "u1", headers=headers)
    assert producer.flush(10) == 0
    normaliser = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        first, first_seconds = replay_raw(settings)
        assert first.returncode == 0, first.stderr
        assert "replayed 1 dead letters" in first.stdout, first.stdout
        # The normaliser rejected the replayed letter again: a second letter, marked by the replay.
        assert len(letters(settings, 2)) >= 2
        (replayed,) = settle(settings, "raw", timeout=2)
        marks = header_map(replayed.headers())
        assert marks["replayed_from"].startswith(settings.names.dlq("raw") + ":")
        assert len(marks["replay_run"]) == 32

        # A re-run replays the one new letter, once: the one it causes is left for the run after.
        second, second_seconds = replay_raw(settings)
        assert second.returncode == 0, second.stderr
        assert "replayed 1 dead letters" in second.stdout, second.stdout
        assert len(letters(settings, 3)) >= 3
        runs = {header_map(m.headers())["replay_run"] for m in settle(settings, "raw", timeout=2)}
        assert len(runs) == 2  # each run marked what it re-produced with its own id
        assert normaliser.alive()
    finally:
        assert normaliser.terminate() == 0
    assert len(settle(settings, "dlq.raw", timeout=3)) == 3  # nothing replayed behind our back
    assert max(first_seconds, second_seconds) < 30, (first_seconds, second_seconds)


def test_a_replayed_letter_that_fails_again_says_where_it_was_replayed_from(settings, tmp_path):
    headers = dead_letter_headers(
        error="malformed JSON",
        kind=Kind.INVALID,
        original_topic=settings.names.raw,
        original_partition=0,
        original_offset=0,
        destination="raw",
    )
    producer = settings.kafka.producer()
    producer.produce(settings.names.dlq("raw"), POISON, "u1", headers=headers)
    assert producer.flush(10) == 0
    normaliser = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        done, _seconds = replay_raw(settings)
        assert done.returncode == 0, done.stderr
        again = [m for m in letters(settings, 2) if m.offset() > 0]
    finally:
        assert normaliser.terminate() == 0
    assert again, "the replayed letter was not dead-lettered again"
    assert header_map(again[0].headers()).get("replayed_from", "").startswith(settings.names.dlq("raw"))
