"""The `segment-worker` command (also `python -m worker`).

Command names are the public contract (docs/CONTRACT.md#commands).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
import orjson

from worker import health, logs
from worker.config import Config, load_config
from worker.config_loader import CONFIG_EXIT_CODE, ConfigError
from worker.destinations import registry
from worker.members import MEMBER_ENV, PROCESSES_OPTION, Supervisor, member_arguments, watch_supervisor
from worker.names import RAW
from worker.runtime import settle_gc


def _config(ctx: click.Context) -> Config:
    return ctx.obj["config"]  # type: ignore[no-any-return]


@contextmanager
def _refusing_bad_config() -> Iterator[None]:
    """A setting that cannot be used stops start-up with one line naming it, and exit code 2."""
    try:
        yield
    except ConfigError as exc:
        click.echo(f"segment-worker: configuration error: {exc}", err=True)
        sys.exit(CONFIG_EXIT_CODE)


# Exit code of a role that stopped itself: its own machinery failed, or too many dead letters in a row.
ROLE_FAILED_EXIT_CODE = 3


@contextmanager
def _stopping_on_role_failure() -> Iterator[None]:
    """The failures that end a role (never one event's problem) end it with one clear log line."""
    from worker.dlq.writer import DeadLetterLimitExceeded
    from worker.kafka.producer import ProducerFatal

    try:
        yield
    except (DeadLetterLimitExceeded, ProducerFatal) as exc:
        logs.get("worker.cli").error("role stopped", reason=str(exc), error=type(exc).__name__)
        sys.exit(ROLE_FAILED_EXIT_CODE)


class DestinationName(click.ParamType):
    """A registered destination (read when the command line is parsed, so a registered plug-in counts)."""

    name = "destination"

    def __init__(self, *, raw: bool = False) -> None:
        self.raw = raw

    def choices(self) -> list[str]:
        return [*registry.names(), *([RAW] if self.raw else [])]

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value in self.choices():
            return str(value)
        self.fail(f"{value!r} is not one of {', '.join(self.choices())}", param, ctx)


class _Shutdown:
    """SIGTERM/SIGINT handling installed before a role starts up, so a signal that arrives while it is
    still connecting is not lost (or fatal): whatever is registered later is stopped at once."""

    requested = False
    stoppers: list[Callable[[], None]] = []

    @classmethod
    def install(cls) -> None:
        def handler(_signum: int, _frame: object) -> None:
            cls.request()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        watch_supervisor(cls.request)  # a member of `--processes N` stops when its supervisor is gone

    @classmethod
    def request(cls) -> None:
        cls.requested = True
        for stop in cls.stoppers:
            stop()


def _stop_on_signals(stop: Callable[[], None]) -> None:
    _Shutdown.stoppers.append(stop)
    if _Shutdown.requested:
        stop()


_processes_option = click.option(
    PROCESSES_OPTION,
    "processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="run N members of the consumer group (one a core); METRICS_PORT + i serves member i",
)


def _run_as_members_if_asked(config: Config, processes: int) -> None:
    """With --processes N > 1 this process only supervises N members (worker.members) and exits with them."""
    if processes == 1:
        return
    supervisor = Supervisor(member_arguments(sys.argv[1:]), processes, config.settings.metrics_port)
    supervisor.install_signal_handlers()
    sys.exit(supervisor.run())


@click.group()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="dotenv-style file; env wins")
@click.option("--log-level", default="INFO", show_default=True)
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str) -> None:
    """Segment-spec events on Kafka: normalise, enrich, fan out, deliver."""
    logs.configure(log_level.upper(), os.environ.get(MEMBER_ENV))
    ctx.ensure_object(dict)
    with _refusing_bad_config():
        ctx.obj["config"] = load_config(os.environ, config_file)


@cli.command()
@click.option("--port", default=9092, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--apache-kafka", is_flag=True, help="Apache Kafka (KRaft, from its Maven Central jars; needs java, mvn)")
@click.pass_context
def broker(ctx: click.Context, port: int, host: str, apache_kafka: bool) -> None:
    """Run a broker on this machine in the foreground: the embedded one (Tansu, memory storage) by default."""
    if apache_kafka:
        from worker.kafka.apache_kafka import run_foreground as run_apache_kafka

        sys.exit(run_apache_kafka(port, host))
    from worker.kafka.broker import run_foreground

    sys.exit(run_foreground(port, host, _config(ctx).sources.get("TANSU_BIN")))


@cli.group()
def topics() -> None:
    """Topic administration."""


@topics.command("create")
@click.option("--partitions", type=int, help="partitions for new topics (default TOPIC_PARTITIONS)")
@click.pass_context
def topics_create(ctx: click.Context, partitions: int | None) -> None:
    """Create every topic with configured partitions; safe to re-run."""
    from worker.topics import create_all

    config = _config(ctx)
    if partitions:
        config = config.with_settings(topic_partitions=partitions)
    for name, state in sorted(create_all(config).items()):
        click.echo(f"{state:8} {name}")


@cli.command()
@_processes_option
@click.pass_context
def normalize(ctx: click.Context, processes: int) -> None:
    """Run the normaliser consumer group (segment.raw -> segment.dest.*)."""
    from worker.normalize.strategy import build

    config = _config(ctx)
    _run_as_members_if_asked(config, processes)
    _Shutdown.install()
    with _refusing_bad_config():
        loop, reader = build(config)
    health.serve(config.settings.metrics_port)
    _stop_on_signals(loop.stop)
    reader.start()
    settle_gc()
    try:
        with _stopping_on_role_failure():
            loop.run()
    finally:
        reader.close()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to accept from other machines")
@click.option("--port", default=8088, show_default=True)
@click.pass_context
def collect(ctx: click.Context, host: str, port: int) -> None:
    """Segment-compatible HTTP API (any Segment SDK) into segment.raw; /healthz, /readyz, /metrics on PORT."""
    from worker.collector.server import checked_settings, serve_forever

    config = _config(ctx)
    with _refusing_bad_config():
        collector_settings = checked_settings(config)
    serve_forever(config, collector_settings, host, port)


@cli.command()
@click.argument("destination", type=DestinationName())
@_processes_option
@click.pass_context
def sink(ctx: click.Context, destination: str, processes: int) -> None:
    """Run DESTINATION's sink consumer group (segment.dest.DESTINATION -> its API)."""
    from worker.sink.strategy import build

    config = _config(ctx)
    _run_as_members_if_asked(config, processes)
    _Shutdown.install()
    with _refusing_bad_config():
        loop = build(config, destination)
    health.serve(config.settings.metrics_port)
    _stop_on_signals(loop.stop)
    settle_gc()
    with _stopping_on_role_failure():
        loop.run()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8089, show_default=True)
@click.pass_context
def standins(ctx: click.Context, host: str, port: int) -> None:
    """Serve local stand-ins of the destination APIs (for demo and tests; not a real destination)."""
    from worker.standins.server import serve_forever

    serve_forever(_config(ctx).sources, host, port)


DLQ_CHOICES = DestinationName(raw=True)


@cli.group()
def dlq() -> None:
    """Dead letters: inspect them, replay them."""


@dlq.command("inspect")
@click.argument("destination", type=DLQ_CHOICES)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--samples", default=3, show_default=True, help="how many dead letters to show in full")
@click.pass_context
def dlq_inspect(ctx: click.Context, destination: str, as_json: bool, samples: int) -> None:
    """Counts of DESTINATION's dead letters by kind and reason, oldest/newest, samples with headers."""
    from worker.dlq.inspect import inspect, print_inspection

    with _refusing_bad_config():
        result = inspect(_config(ctx), destination, samples)
    if as_json:
        click.echo(orjson.dumps(result.as_json()).decode())
    else:
        print_inspection(result, sys.stdout)


@dlq.command("replay")
@click.argument("destination", type=DLQ_CHOICES)
@click.option("--reason", help="only dead letters whose error contains this text (case-insensitive)")
@click.option("--since", help="only dead letters that failed at or after this ISO-8601 time")
@click.option("--max", "max_messages", type=int, help="replay at most N, then stop (a re-run continues)")
@click.option("--dry-run", is_flag=True, help="count what would be replayed; write and commit nothing")
@click.option("--rate", type=float, help="at most this many dead letters a second")
@click.pass_context
def dlq_replay(
    ctx: click.Context,
    destination: str,
    reason: str | None,
    since: str | None,
    max_messages: int | None,
    dry_run: bool,
    rate: float | None,
) -> None:
    """Re-produce DESTINATION's dead letters to their original topic (raw: back through the normaliser)."""
    from worker.dlq.replay import ReplayFilter, print_replay, replay

    try:
        filters = ReplayFilter(reason=reason, since=since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    with _refusing_bad_config():
        report = replay(_config(ctx), destination, filters, max_messages, dry_run, rate)
    print_replay(report, dry_run, sys.stdout)


@cli.command()
@click.argument("topic")
@click.option("--from-beginning", is_flag=True, help="start at the oldest message (default: only new ones)")
@click.option("-n", "limit", type=int, help="stop after N messages")
@click.option("--idle", "idle_timeout", type=float, help="stop after this many quiet seconds")
@click.pass_context
def tail(ctx: click.Context, topic: str, from_beginning: bool, limit: int | None, idle_timeout: float | None) -> None:
    """Print TOPIC's messages decoded (JSON lines) with key, partition, offset and headers."""
    from worker.tail import tail as run_tail

    config = _config(ctx)
    with _refusing_bad_config():
        run_tail(config.kafka, config.names.full_topic(topic), from_beginning, limit, idle_timeout)


@cli.command()
@click.option("--keep-running", is_flag=True, help="leave the stack up and print how to send more")
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["embedded", "apache-kafka"]),
    default="embedded",
    show_default=True,
    help="apache-kafka: a real Apache Kafka node from its Maven Central jars (needs java and mvn)",
)
@click.pass_context
def demo(ctx: click.Context, keep_running: bool, broker_kind: str) -> None:
    """Everything on one machine with the embedded broker; sends sample traffic and prints what came out."""
    from worker.demo import run_demo

    config = _config(ctx)
    sys.exit(run_demo(config, config.sources.get("TANSU_BIN"), keep_running, broker_kind))


def main() -> None:
    cli(prog_name="segment-worker")
