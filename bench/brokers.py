"""The one place the benches choose and start their broker: `--broker embedded|apache-kafka|both`.

embedded is Tansu (the default: no JVM); apache-kafka is a real Apache Kafka KRaft node from its
cached Maven jars (worker/kafka/apache_kafka.py, ~3 s to start); both runs the whole measurement
on each in turn, in one invocation, so their figures are measured side by side. Figures are judged
on Apache Kafka (docs/BENCHMARKS.md), the embedded broker's beside them.

Each broker carries the client settings only it needs (`client_workarounds`: the embedded broker's
short session timeout and heartbeat; none on Apache Kafka, whose clients get the settings users
get). `bench_config` puts them in the configuration's sources, so every client the bench makes and
every role it starts (whose environment is built from `config.sources`) gets them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from worker.config import Config
from worker.kafka.apache_kafka import KAFKA_VERSION, ApacheKafkaBroker
from worker.kafka.broker import EmbeddedBroker, LoopbackBroker, free_port

T = TypeVar("T")

BROKER_KINDS = ("embedded", "apache-kafka")
PREFIX = "bench."
GROUP_PREFIX = "bench-"


def add_broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        choices=(*BROKER_KINDS, "both"),
        default="embedded",
        help=f"embedded (Tansu, the default), apache-kafka (Apache Kafka {KAFKA_VERSION} from its jars), "
        "or both, one after the other in this run",
    )


def broker_kinds(choice: str) -> tuple[str, ...]:
    """The kinds `--broker choice` runs, in order (both: the embedded broker first)."""
    return BROKER_KINDS if choice == "both" else (choice,)


def broker_class(kind: str) -> type[EmbeddedBroker] | type[ApacheKafkaBroker]:
    if kind not in BROKER_KINDS:
        raise ValueError(f"unknown broker {kind!r}; known: {', '.join(BROKER_KINDS)}")
    return EmbeddedBroker if kind == "embedded" else ApacheKafkaBroker


def client_workarounds(kind: str) -> dict[str, str]:
    """The KAFKA_* settings only `kind` needs, without starting one (for the benches' own child processes)."""
    return dict(broker_class(kind).client_workarounds)


def describe(kind: str) -> str:
    return "embedded broker (Tansu)" if kind == "embedded" else f"Apache Kafka {KAFKA_VERSION} (KRaft)"


def start_broker(kind: str, log_dir: Path) -> LoopbackBroker:
    """A started broker of `kind` on a free loopback port, logging to `log_dir/<kind>.log`. Stop it with `.stop()`."""
    log_path = log_dir / f"{kind}.log"
    broker: LoopbackBroker
    if broker_class(kind) is EmbeddedBroker:
        broker = EmbeddedBroker(free_port(), log_path=log_path)
    else:
        broker = ApacheKafkaBroker(log_path=log_path)
    broker.start()
    print(f"broker: {describe(kind)} on {broker.bootstrap_servers}", flush=True)
    return broker


def bench_config(broker: LoopbackBroker, partitions: int, **variables: str) -> Config:
    """The benches' configuration on `broker`: their own topic and group prefixes, and its workarounds."""
    return Config.from_sources(
        {
            **broker.client_workarounds,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "TOPIC_PREFIX": PREFIX,
            "CONSUMER_GROUP_PREFIX": GROUP_PREFIX,
            "TOPIC_PARTITIONS": str(partitions),
            **variables,
        }
    )


def on_each_broker(choice: str, log_prefix: str, measure: Callable[[LoopbackBroker, Path], T]) -> dict[str, T]:
    """`measure(broker, log_dir)` on a fresh broker of each kind `--broker choice` names, in order;
    kind -> result. Logs go to a temporary folder, removed after a clean run, kept (and named on
    stderr) after a failure."""
    log_dir = Path(tempfile.mkdtemp(prefix=log_prefix))
    results: dict[str, T] = {}
    ok = False
    try:
        for kind in broker_kinds(choice):
            kind_dir = log_dir / kind
            kind_dir.mkdir()
            broker = start_broker(kind, kind_dir)
            try:
                results[kind] = measure(broker, kind_dir)
            finally:
                broker.stop()
        ok = True
    finally:
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"logs kept in {log_dir}", file=sys.stderr)
    return results
