"""`--processes N`: one command runs N members of a role's consumer group (worker.members)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.integration.test_broker_behaviour import TANSU_WEDGE, _events, _ids
from tests.kafka_helpers import crash_test_variables, produce, read, settings_for, setup_topics, start_role
from tests.sink_helpers import FAST_SINK_ENV, metric_value, track_events, wait_until, write_events
from worker.kafka.broker import free_port

pytestmark = pytest.mark.integration

PARTITIONS = 4
DELIVERED = 'segment_worker_delivered_total{destination="amplitude"}'


@pytest.fixture(autouse=True)
def reset(clean_standins):
    """Every test starts with stand-ins that remember nothing and inject no fault."""


def free_ports(count: int) -> int:
    """A port P with P .. P + count - 1 all free now (member i serves on P + i): tests run in
    parallel, and a port next to a free one is often another test's."""
    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as held:
                for offset in range(1, count):
                    held.enter_context(socket.create_server(("127.0.0.1", base + offset)))
            return base
        except OSError:
            continue
    raise AssertionError(f"no {count} free ports in a row on loopback")


def supervised_sink(settings, standins, tmp_path, processes: int = 2, **env: str):
    port = free_ports(processes)
    role = start_role(
        settings,
        ["sink", "amplitude", "--processes", str(processes)],
        tmp_path,
        **{**FAST_SINK_ENV, **standins.env(), "METRICS_PORT": str(port), **env},
    )
    return role, [port + i for i in range(processes)]


def started_members(log: Path) -> dict[int, list[int]]:
    """member index -> the PIDs the supervisor started for it, in order."""
    started: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "member started":
            started.setdefault(record["member"], []).append(record["pid"])
    return started


def wait_settled(ports: list[int], timeout: float = 60.0) -> None:
    """Every member holds partitions, and together all of them (the group has settled)."""

    def settled() -> bool:
        held = [metric_value(port, "segment_worker_assigned_partitions") for port in ports]
        return all(h is not None and h > 0 for h in held) and sum(h or 0 for h in held) == PARTITIONS

    wait_until(settled, timeout, f"members on {ports} share the {PARTITIONS} partitions")


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped has exited too)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_two_members_share_the_partitions_deliver_everything_and_stop_with_the_supervisor(
    broker, prefix, standins, tmp_path
):
    settings = settings_for(broker, prefix, partitions=PARTITIONS)
    setup_topics(settings)
    events = track_events(400, users=40)
    role, ports = supervised_sink(settings, standins, tmp_path)
    try:
        wait_settled(ports)
        write_events(settings, "amplitude", events)
        received = standins.wait_received("amplitude", len(events))
        assert set(received) == {e["messageId"] for e in events}
        assert standins.stats("amplitude")["duplicates"] == 0
        delivered = [metric_value(port, DELIVERED) for port in ports]
        assert all(d is not None and d > 0 for d in delivered), delivered  # both members delivered
        members = started_members(role.log_path)
        assert sorted(members) == [0, 1] and all(len(pids) == 1 for pids in members.values()), members
        assert '"member": 1' in role.log_path.read_text()  # a member's own lines say which it is
    finally:
        assert role.terminate() == 0
    assert all(gone(pids[0]) for pids in members.values())


def test_a_member_killed_is_started_again_and_its_partitions_are_delivered(broker, prefix, standins, tmp_path):
    if broker.kind == "embedded":
        pytest.skip(TANSU_WEDGE)  # the new member joins while the killed one's session runs out
    settings = settings_for(broker, prefix, partitions=PARTITIONS, **crash_test_variables(broker))
    setup_topics(settings)
    role, ports = supervised_sink(settings, standins, tmp_path)
    try:
        wait_settled(ports)
        victim = started_members(role.log_path)[1][0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(started_members(role.log_path).get(1, [])) == 2, 30, "member 1 started again")
        assert started_members(role.log_path)[1][1] != victim
        wait_settled(ports, timeout=90)
        events = track_events(300, users=30, prefix="after-kill-")
        write_events(settings, "amplitude", events)
        received = standins.wait_received("amplitude", len(events))
        assert set(received) == {e["messageId"] for e in events}
        assert "member exited; starting it again" in role.log_path.read_text()
    finally:
        assert role.terminate() == 0


def test_members_stop_by_themselves_when_their_supervisor_is_killed(broker, prefix, standins, tmp_path):
    settings = settings_for(broker, prefix, partitions=PARTITIONS)
    setup_topics(settings)
    role, ports = supervised_sink(settings, standins, tmp_path)
    members: list[int] = []
    try:
        wait_settled(ports)
        members = [pids[0] for pids in started_members(role.log_path).values()]
        role.process.kill()
        role.process.wait()
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in members) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(gone(pid) for pid in members), "a member outlived its supervisor"
        assert role.log_path.read_text().count("supervisor is gone; stopping") == len(members)
    finally:
        for pid in members:  # only if the assertion above failed: never leave them running
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_configuration_error_stops_every_member_at_once(broker, prefix, standins, tmp_path):
    """No restart loop for what no restart cures: the supervisor exits 2 as a single role would."""
    settings = settings_for(broker, prefix, partitions=PARTITIONS)
    setup_topics(settings)
    role, _ports = supervised_sink(settings, standins, tmp_path, processes=3, AMPLITUDE_API_KEY="")
    try:
        assert role.process.wait(60) == 2
    finally:
        role.terminate()
    log = role.log_path.read_text()
    assert "AMPLITUDE_API_KEY is not set" in log
    assert "member exited; starting it again" not in log
    assert all(len(pids) == 1 for pids in started_members(role.log_path).values())


def test_the_normaliser_runs_as_two_members_too(broker, prefix, tmp_path):
    settings = settings_for(broker, prefix, partitions=PARTITIONS)
    setup_topics(settings)
    port = free_ports(2)
    role = start_role(
        settings, ["normalize", "--processes", "2"], tmp_path, DESTINATIONS="amplitude", METRICS_PORT=str(port)
    )
    try:
        wait_settled([port, port + 1])
        produce(settings, "raw", _events(0, 2000))
        messages = read(settings, "dest.amplitude", lambda seen: len(_ids(seen)) >= 2000, timeout=60)
        assert _ids(messages) == {f"b{i}" for i in range(2000)}
        produced = f'segment_worker_produced_total{{topic="{settings.names.full_topic("dest.amplitude")}"}}'
        counts = lambda: [metric_value(p, produced) or 0 for p in (port, port + 1)]  # noqa: E731
        # Counted once a batch is acknowledged: moments after its records can be read.
        wait_until(lambda: sum(counts()) >= 2000, 30, "both members count what they produced")
        assert all(n > 0 for n in counts()), counts()  # both members did part of the work
    finally:
        assert role.terminate() == 0
