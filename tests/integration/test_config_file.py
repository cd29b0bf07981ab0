"""Every setting given only in a `--config` dotenv file takes effect (and the environment still wins).

Each role runs as a real `python -m worker --config FILE ...` process whose environment holds none of
our variables: the test process's own are removed first (`Role` passes `os.environ` on), and each
test reads the started process's /proc/PID/environ to prove it. Real broker, real HTTP, loopback only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
import requests

from tests.kafka_helpers import produce, read_count, settings_for, setup_topics
from tests.sink_helpers import Standins, track_events, write_events
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.destinations import registry
from worker.dlq.headers import header_map
from worker.kafka.broker import LoopbackBroker, free_port, wait_for_port
from worker.kafka.reading import assign_all, read_until_quiet
from worker.processes import Role

pytestmark = pytest.mark.integration

# Every variable of ours starts with one of these (names compared upper-cased, as the loader does).
OUR_VARIABLES = (
    "KAFKA_",
    "TOPIC_",
    "CONSUMER_GROUP_",
    "DESTINATIONS",
    "SINK_",
    "COLLECTOR_",
    "AMPLITUDE_",
    "AMBERFLO_",
    "RETENO_",
    "BREVO_",
    "METRICS_PORT",
    "SEGMENT_WORKER_CONFIG",
)
CODEC = EventCodec()


def ours(name: str) -> bool:
    return name.upper().startswith(OUR_VARIABLES)


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test process's environment without any variable of ours (what every role inherits)."""
    for name in list(os.environ):
        if ours(name):
            monkeypatch.delenv(name)
    return dict(os.environ)


def write_config(path: Path, values: dict[str, str]) -> Path:
    lines = ["# written by tests/integration/test_config_file.py", *(f"{k}={v}" for k, v in values.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def kafka_file_values(broker: LoopbackBroker, prefix: str) -> dict[str, str]:
    """The Kafka side of a role's configuration, for the file."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "TOPIC_PREFIX": prefix,
        "CONSUMER_GROUP_PREFIX": prefix,
        **broker.client_workarounds,  # what only the broker under test needs (none on Apache Kafka)
        # A librdkafka property that is not a default: it must reach the role's consumer from the file.
        "KAFKA_MAX_POLL_INTERVAL_MS": "290000",
    }


def environ_of(pid: int, timeout: float = 5.0) -> bytes:
    """The environment a process was started with. Popen may return (vfork) while the kernel is still
    setting up the exec'd image, when /proc/PID/environ reads empty: wait for it."""
    deadline = time.monotonic() + timeout
    while not (environ := Path(f"/proc/{pid}/environ").read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert environ, f"/proc/{pid}/environ stayed empty"
    return environ


def start(config_file: Path, args: list[str], log_path: Path, **env: str) -> Role:
    """`python -m worker --config FILE ARGS...` with the bare environment (plus `env`), checked to be so."""
    role = Role(["--config", str(config_file), *args], env, log_path)
    names = {entry.split(b"=", 1)[0].decode() for entry in environ_of(role.pid).split(b"\0") if entry}
    assert {n for n in names if ours(n)} == set(env), "the role must see only the file's settings"
    return role


def log_of(role: Role) -> str:
    assert role.log_path is not None
    return role.log_path.read_text(errors="replace")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def wait_ready(role: Role, port: int, timeout: float = 20.0) -> str:
    """Poll /readyz on METRICS_PORT until it answers 200 (the role has its partitions)."""
    deadline = time.monotonic() + timeout
    status, body = 0, ""
    while time.monotonic() < deadline:
        assert role.alive(), log_of(role)[-3000:]
        status, body = get(port, "/readyz")
        if status == 200:
            return body
        time.sleep(0.1)
    raise AssertionError(f"/readyz on METRICS_PORT={port} never said ready ({status} {body!r}): {log_of(role)[-3000:]}")


def quiet_topics(settings: Config, topics: list[str], idle: float = 1.0, timeout: float = 10.0) -> list[str]:
    """Topics (short names) that hold any message, read from the beginning until quiet for `idle` s."""
    consumer = settings.kafka.reader("cfgfile-check")
    try:
        assign_all(consumer, [settings.names.full_topic(t) for t in topics])
        return sorted({m.topic() for m in read_until_quiet(consumer, idle, time.monotonic() + timeout)})
    finally:
        consumer.close()


class KeyedStandins(Standins):
    """The stand-in destinations accepting `amplitude_key` only (not the default stand-in key), so a
    delivery proves the sink sent the key from the file."""

    def __init__(self, log_dir: Path, amplitude_key: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.role = Role(
            ["standins", "--port", str(self.port)], {"AMPLITUDE_API_KEY": amplitude_key}, log_dir / "s.log"
        )
        wait_for_port("127.0.0.1", self.port, 15)


# -- sink ------------------------------------------------------------------------------------------


def test_sink_takes_kafka_sink_destination_and_metrics_settings_from_the_file(broker, prefix, bare_env, tmp_path):
    settings = settings_for(broker, prefix, partitions=2)
    setup_topics(settings)
    key = f"cfgfile-amplitude-{uuid.uuid4().hex[:8]}"
    standins = KeyedStandins(tmp_path, key)
    metrics_port = free_port()
    config_file = write_config(
        tmp_path / "sink.env",
        {
            **kafka_file_values(broker, prefix),
            # A KAFKA_* client property that is observable without touching the shared broker:
            # librdkafka's `debug=conf` prints each client's configuration at creation (to the role's
            # stderr), under the client's name `<client.id>#consumer-N`. So the log shows that
            # KAFKA_CLIENT_ID, KAFKA_DEBUG and the file's session/heartbeat timeouts reached the
            # group consumer, and nothing else could print them (the defaults print no CONF lines).
            # (KAFKA_SECURITY_PROTOCOL=SSL against the plaintext broker was rejected: its failure is
            # slow and indirect, and it throws TLS records at the broker every other test shares.)
            "KAFKA_CLIENT_ID": "cfgfile-sink",
            "KAFKA_DEBUG": "conf",
            "AMPLITUDE_API_KEY": key,
            "AMPLITUDE_BASE_URL": standins.base,
            "AMPLITUDE_EVENTS_PER_SECOND": "1000000",
            # The default (12 attempts, circuit opening after 5 failed requests) would keep retrying
            # a failing event for an hour; 1 dead-letters it `exhausted` on its first failure.
            "SINK_MAX_ATTEMPTS": "1",
            "SINK_LINGER_MS": "20",
            "METRICS_PORT": str(metrics_port),
        },
    )
    sink = start(config_file, ["sink", "amplitude"], tmp_path / "sink.log")
    try:
        assert "ready" in wait_ready(sink, metrics_port)  # METRICS_PORT from the file serves /readyz

        delivered = track_events(5, prefix="ok")
        write_events(settings, "amplitude", delivered)
        received = standins.wait_received("amplitude", len(delivered), timeout=20)
        assert set(received) == {e["messageId"] for e in delivered}, log_of(sink)[-3000:]
        # The stand-in answers 400 "Invalid API key" to any other key: only 2xx means the file's key.
        assert set(standins.stats("amplitude")["statuses"]) == {"200"}

        requests_before = standins.stats("amplitude")["requests"]
        standins.faults("amplitude", error_rate=1.0, seed=1)  # every request gets 500/502/503
        failing = track_events(3, prefix="bad")
        write_events(settings, "amplitude", failing)
        dead = {
            CODEC.decode(m.value())[0]["messageId"]: header_map(m.headers())
            for m in read_count(settings, "dlq.amplitude", len(failing), timeout=20)
        }
        status, metrics_text = get(metrics_port, "/metrics")
        received_in_the_end = standins.received("amplitude")
        requests_failing = standins.stats("amplitude")["requests"] - requests_before
    finally:
        exit_code = sink.terminate()
        standins.stop()
    assert exit_code == 0, log_of(sink)[-3000:]

    assert set(dead) == {e["messageId"] for e in failing}
    for headers in dead.values():
        assert headers["error_kind"] == "exhausted" and headers["attempts"] == "1", headers
        assert headers["http_status"].startswith("5") and headers["destination"] == "amplitude", headers
    assert set(received_in_the_end) == set(received)  # nothing of the failing ones got through
    assert 1 <= requests_failing <= len(failing)  # they failed, and none was retried

    assert status == 200
    assert f'segment_worker_delivered_total{{destination="amplitude"}} {len(delivered)}.0' in metrics_text
    assert 'segment_worker_retried_total{destination="amplitude"} 0.0' in metrics_text
    assert 'segment_worker_dead_lettered_total{destination="amplitude",kind="exhausted"} 3.0' in metrics_text

    log = log_of(sink)
    consumer_conf = [line for line in log.splitlines() if "|CONF|cfgfile-sink#consumer-" in line]
    assert any(line.endswith("max.poll.interval.ms = 290000") for line in consumer_conf), log[-3000:]
    assert any(line.endswith(f"group.id = {prefix}sink-amplitude") for line in consumer_conf), log[-3000:]
    assert key not in log  # the API key from the file is never logged


# -- collector -------------------------------------------------------------------------------------


def start_collector(config_file: Path, log_path: Path, **env: str) -> tuple[Role, str]:
    port = free_port()
    role = start(config_file, ["collect", "--host", "127.0.0.1", "--port", str(port)], log_path, **env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert role.alive(), log_of(role)[-3000:]
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return role, url
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"collector did not serve: {log_of(role)[-3000:]}"
        time.sleep(0.05)


def post_track(url: str, write_key: str, message_id: str) -> int:
    body = {"userId": "user-1", "event": "Config Checked", "messageId": message_id}
    return requests.post(f"{url}/v1/track", json=body, auth=(write_key, ""), timeout=10).status_code


def raw_message_ids(settings: Config, count: int) -> list[str]:
    messages = read_count(settings, "raw", count, timeout=15)
    payloads = [orjson.loads(m.value()) for m in messages]
    # /v1/track writes the event itself; /v1/batch (the SDKs) an envelope with a `batch`.
    return [event["messageId"] for p in payloads for event in p.get("batch", [p])]


def test_collector_takes_write_keys_and_kafka_settings_from_the_file(broker, prefix, bare_env, tmp_path):
    settings = settings_for(broker, prefix, partitions=1)
    setup_topics(settings)
    config_file = write_config(
        tmp_path / "collect.env", {**kafka_file_values(broker, prefix), "COLLECTOR_WRITE_KEYS": "wk-file-a, wk-file-b"}
    )
    collector, url = start_collector(config_file, tmp_path / "collect.log")
    try:
        assert post_track(url, "wk-file-b", "cfg-accepted") == 200
        assert post_track(url, "wk-not-in-file", "cfg-refused") == 401
        assert post_track(url, "wk-file-a", "cfg-accepted-2") == 200
        assert raw_message_ids(settings, 2) == ["cfg-accepted", "cfg-accepted-2"]  # in the file's namespace
    finally:
        assert collector.terminate() == 0, log_of(collector)[-3000:]


def test_the_environment_wins_over_the_file(broker, prefix, bare_env, tmp_path):
    settings = settings_for(broker, prefix, partitions=1)
    setup_topics(settings)
    config_file = write_config(
        tmp_path / "collect.env", {**kafka_file_values(broker, prefix), "COLLECTOR_WRITE_KEYS": "wk-from-file"}
    )
    collector, url = start_collector(config_file, tmp_path / "collect.log", COLLECTOR_WRITE_KEYS="wk-from-env")
    try:
        assert post_track(url, "wk-from-file", "cfg-file-key") == 401
        assert post_track(url, "wk-from-env", "cfg-env-key") == 200
        assert raw_message_ids(settings, 1) == ["cfg-env-key"]
    finally:
        assert collector.terminate() == 0, log_of(collector)[-3000:]


# -- normaliser ------------------------------------------------------------------------------------


def test_normaliser_writes_only_to_the_destinations_in_the_file(broker, prefix, bare_env, tmp_path):
    settings = settings_for(broker, prefix, partitions=2)
    setup_topics(settings)
    assert set(registry.names()) > {"amplitude", "brevo"}  # the default would fan out to all of them
    config_file = write_config(
        tmp_path / "normalize.env", {**kafka_file_values(broker, prefix), "DESTINATIONS": "amplitude"}
    )
    normaliser = start(config_file, ["normalize"], tmp_path / "normalize.log")
    try:
        event = {
            "type": "track",
            "userId": "user-1",
            "event": "Config Checked",
            "messageId": "cfg-normalised",
            "timestamp": "2026-11-22T10:00:00.000Z",
        }
        produce(settings, "raw", [("user-1", orjson.dumps(event))])
        [message] = read_count(settings, "dest.amplitude", 1, timeout=20)
        # Everything for one raw message is written before its offset is stored, so by now any
        # other destination's copy would be on its topic as well.
        others = [f"dest.{d}" for d in registry.names() if d != "amplitude"]
        written_elsewhere = quiet_topics(settings, others)
    finally:
        assert normaliser.terminate() == 0, log_of(normaliser)[-3000:]
    assert CODEC.decode(message.value())[0]["messageId"] == "cfg-normalised"
    assert message.key() == b"user-1"
    assert written_elsewhere == []


# -- refused configurations ------------------------------------------------------------------------

SECRETS = ("sekrit-123", "sekrit-wk-456")


def bad_config_values() -> dict[str, str]:
    """A complete configuration (credentials included) pointing at nothing that listens."""
    closed = free_port()
    return {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}",
        "AMPLITUDE_API_KEY": SECRETS[0],
        "AMPLITUDE_BASE_URL": f"http://127.0.0.1:{closed}",
        "COLLECTOR_WRITE_KEYS": SECRETS[1],
    }


def run_worker(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A role that wrongly started would wait for a broker that is not there: the timeout fails it.
    return subprocess.run([sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=20)


COLLECT = ["collect", "--host", "127.0.0.1", "--port", "0"]
MISSING = object()


@pytest.mark.parametrize(
    ("changes", "args", "named"),
    [
        pytest.param({"SINK_CONCURRENCY": "0"}, ["sink", "amplitude"], "SINK_CONCURRENCY=0", id="SINK_CONCURRENCY=0"),
        pytest.param(
            {"SINK_MAX_BUFFERED_EVENTS": "-5"},
            ["sink", "amplitude"],
            "SINK_MAX_BUFFERED_EVENTS=-5",
            id="SINK_MAX_BUFFERED_EVENTS=-5",
        ),
        pytest.param({"AMPLITUDE_API_KEY": MISSING}, ["sink", "amplitude"], "AMPLITUDE_API_KEY", id="no-api-key"),
        pytest.param(
            {"DESTINATIONS": "amplitude,mixpanel"}, ["normalize"], "DESTINATIONS=amplitude,mixpanel", id="mixpanel"
        ),
        pytest.param({"COLLECTOR_WRITE_KEYS": ""}, COLLECT, "COLLECTOR_WRITE_KEYS", id="no-write-keys"),
    ],
)
def test_a_bad_value_in_the_file_refuses_to_start_with_one_line_naming_it(bare_env, tmp_path, changes, args, named):
    values = {**bad_config_values(), **changes}
    values = {k: v for k, v in values.items() if v is not MISSING}
    config_file = write_config(tmp_path / "bad.env", values)
    out = run_worker(["--config", str(config_file), *args], bare_env)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    [line] = out.stderr.splitlines()  # one line, nothing else (no traceback, no log noise)
    assert line.startswith("segment-worker: configuration error: ") and named in line, line
    assert out.stdout == ""
    for secret in SECRETS:
        assert secret not in out.stdout + out.stderr


def test_a_config_file_that_does_not_exist_refuses_to_start(bare_env, tmp_path):
    missing = tmp_path / "nowhere" / "worker.env"
    out = run_worker(["--config", str(missing), "sink", "amplitude"], bare_env)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    [line] = out.stderr.splitlines()
    assert line.startswith("segment-worker: configuration error: ") and str(missing) in line, line


def test_an_unknown_destination_is_a_usage_error(bare_env, tmp_path):
    config_file = write_config(tmp_path / "ok.env", bad_config_values())
    out = run_worker(["--config", str(config_file), "sink", "mixpanel"], bare_env)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    [error] = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert "'mixpanel' is not one of" in error and "amplitude" in error, out.stderr
    assert "Traceback" not in out.stderr
    for secret in SECRETS:
        assert secret not in out.stdout + out.stderr
