"""Identity stitching across normaliser processes, on a real broker.

An anonymous page lands on a raw partition one normaliser owns; ~300 ms later the identify linking
its anonymousId lands on a partition the other one owns. With the wait on, the page reaches Amberflo
(which needs a userId) with the userId, through `segment.identities`; with it off, without.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest

from tests.kafka_helpers import read, settings_for, setup_topics, start_role
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.processes import Role

pytestmark = pytest.mark.integration
# The wait line is the normaliser's own logic over topics both brokers serve alike: the first
# broker chosen is enough (the identity topic itself is tested on both in test_normalize.py).
FIRST_BROKER_ONLY = True
CODEC = EventCodec()
# Generous next to the ~1 s the link takes to come round (the other process, segment.identities,
# this process's next loop turn), so a slow machine does not turn the test into a race.
WAIT_MS = 5000


@pytest.fixture
def settings(broker, prefix) -> Config:
    # fetch.wait.max.ms: the embedded broker answers a fetch only when it runs out (ARCHITECTURE.md
    # gap 7); at the default 500 ms each hop of the link's way round would cost that much.
    settings = settings_for(broker, prefix, partitions=4, KAFKA_FETCH_WAIT_MAX_MS="20")
    setup_topics(settings)
    return settings


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def owned(role: Role) -> set[int]:
    """The raw partitions a normaliser holds now, from its log's assign and revoke lines."""
    partitions: set[int] = set()
    for line in role.log_path.read_text().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or entry.get("event") not in ("partitions assigned", "partitions revoked"):
            continue
        named = {int(name.rsplit("[", 1)[1].rstrip("]")) for name in entry.get("partitions", [])}
        if entry["event"] == "partitions assigned":
            partitions |= named
        else:
            partitions -= named
    return partitions


def write(settings: Config, partition: int, key: str, event: dict) -> None:
    producer = settings.kafka.producer()
    errors: list = []
    producer.produce(
        settings.names.raw, orjson.dumps(event), key, lambda e, _m: errors.append(e) if e else None, partition=partition
    )
    assert producer.flush(10) == 0 and not errors


def run_two_normalisers(settings: Config, tmp_path, wait_ms: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """The page and the identify as each destination received them: {messageId: (key, event)}."""
    env = {"DESTINATIONS": "amplitude,amberflo", "NORMALIZE_STITCH_WAIT_MS": str(wait_ms)}
    first = start_role(settings, ["normalize"], tmp_path, **env)
    second: Role | None = None
    try:
        # One member at a time, each change once the group is stable (ARCHITECTURE.md gap 8).
        wait_for(lambda: owned(first) == {0, 1, 2, 3}, 30, "the first normaliser holds every partition")
        second = start_role(settings, ["normalize"], tmp_path, **env)
        wait_for(
            lambda: bool(owned(second)) and owned(first) == {0, 1, 2, 3} - owned(second),  # type: ignore[arg-type]
            30,
            "the two normalisers share the partitions",
        )
        mine, theirs = min(owned(first)), min(owned(second))
        page = {"type": "page", "anonymousId": "anon-1", "name": "Pricing", "messageId": "page-1"}
        write(settings, mine, "anon-1", page)
        time.sleep(0.3)
        identify = {"type": "identify", "anonymousId": "anon-1", "userId": "user-1", "messageId": "identify-1"}
        write(settings, theirs, "user-1", identify)
        wanted = {"page-1", "identify-1"}
        received = {}
        for destination in ("amberflo", "amplitude"):
            messages = read(
                settings,
                f"dest.{destination}",
                lambda seen: wanted <= {CODEC.decode(m.value())[0]["messageId"] for m in seen},
                timeout=30,
            )
            received[destination] = {
                (event := CODEC.decode(m.value())[0])["messageId"]: {"key": m.key().decode(), **event} for m in messages
            }
    finally:
        assert first.terminate() == 0
        if second is not None:
            assert second.terminate() == 0
    return received["amberflo"], received["amplitude"]


def test_an_anonymous_event_waits_for_the_identify_another_normaliser_processes(settings, tmp_path):
    amberflo, amplitude = run_two_normalisers(settings, tmp_path, WAIT_MS)
    page = amberflo["page-1"]
    assert page.get("userId") == "user-1" and page["key"] == "user-1"
    assert amberflo["identify-1"]["userId"] == "user-1"
    # Amplitude takes anonymous events (it merges a device's history itself): it got the page as it was.
    assert "userId" not in amplitude["page-1"] and amplitude["page-1"]["key"] == "anon-1"


def test_with_the_wait_disabled_the_anonymous_event_goes_without_the_user(settings, tmp_path):
    amberflo, _amplitude = run_two_normalisers(settings, tmp_path, 0)
    page = amberflo["page-1"]
    assert "userId" not in page and page["key"] == "anon-1"
