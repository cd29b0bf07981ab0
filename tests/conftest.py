"""Shared fixtures. Integration tests run against real brokers, one of each kind per session: the
embedded one (Tansu) and Apache Kafka (KRaft, from its Maven Central jars). `--broker` picks them."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.kafka.apache_kafka import ApacheKafkaBroker, ApacheKafkaNotFound
from worker.kafka.broker import EmbeddedBroker, LoopbackBroker, free_port

BROKER_KINDS = ("embedded", "apache-kafka")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broker",
        choices=(*BROKER_KINDS, "both"),
        default=os.environ.get("TEST_BROKER", "both"),
        help="which broker the integration tests run on (default both; env TEST_BROKER)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker_kind" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--broker")
        kinds = BROKER_KINDS if chosen == "both" else (chosen,)
        # Unit tests that merely need a broker to hold messages run on the first broker chosen;
        # the integration suite, and unit modules about broker behaviour (BOTH_BROKERS = True),
        # run on each.
        # An integration module whose subject does not depend on the broker says so with
        # FIRST_BROKER_ONLY = True.
        on_each = "integration" in metafunc.definition.nodeid.split("::")[0].split("/")
        on_each = on_each and not getattr(metafunc.module, "FIRST_BROKER_ONLY", False)
        if not on_each and not getattr(metafunc.module, "BOTH_BROKERS", False):
            kinds = kinds[:1]
        metafunc.parametrize("broker_kind", kinds, scope="session")


def _java_missing() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return None
    return None if shutil.which("java") else "no JDK on this machine (java not on PATH, JAVA_HOME unset)"


@pytest.fixture(scope="session")
def broker(broker_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackBroker]:
    log_dir = Path(tmp_path_factory.mktemp(f"broker-{broker_kind}"))
    running: LoopbackBroker
    if broker_kind == "embedded":
        running = EmbeddedBroker(free_port(), log_path=log_dir / "tansu.log")
    else:
        missing = _java_missing()
        if missing:  # reported as skipped with its reason, never as passed
            pytest.skip(f"Apache Kafka leg: {missing}")
        running = ApacheKafkaBroker(log_path=log_dir / "kafka.log")
    try:
        running.start()
    except ApacheKafkaNotFound as exc:
        pytest.fail(f"Apache Kafka leg could not start: {exc}")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def prefix() -> str:
    """A topic and group namespace of this test's own, so tests sharing the broker never see each other."""
    return f"t{uuid.uuid4().hex[:8]}."


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`), every test on one broker kind goes to one worker,
    so each worker starts one broker, not both; tests that need none are spread over the workers."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("broker_kind") if callspec else None
        if kind:
            item.add_marker(pytest.mark.xdist_group(kind))
