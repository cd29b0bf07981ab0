"""End-to-end latency: producer -> segment.raw -> normaliser -> Amplitude sink -> a receiver.

Events are produced at a steady rate (default 2,000 events/s for 20 s) to `segment.raw`; each one
carries the wall-clock time it was produced (`properties.bench_sent_ns`). The normaliser and the
Amplitude sink run as their own processes with the settings a user gets (plus the broker's client
workarounds), except Amplitude's rate limit, lifted; the sink's Amplitude base URL points at a
receiver in this process, which answers as Amplitude's HTTP V2 API does (200 `{"code": 200, ...}`)
and records when each event arrived.
The first seconds (the group joins, warm caches) are left out. Prints p50, p99 and max.

    .venv/bin/python bench/latency.py [--rate 2000] [--seconds 20] [--broker embedded|apache-kafka|both]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time
from pathlib import Path

import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for brokers, this script's neighbour

from brokers import add_broker_option, bench_config, describe, on_each_broker

from worker.config import Config
from worker.kafka.broker import LoopbackBroker, free_port
from worker.processes import Role
from worker.samples import bench_event
from worker.standins.server import standin_env
from worker.topics import create_all

REPO = Path(__file__).resolve().parent.parent
WARM_UP_SECONDS = 3.0


class Receiver:
    """An Amplitude-shaped HTTP endpoint on 127.0.0.1 that records each event's latency (ms)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.latencies: list[tuple[float, float]] = []  # (sent, latency ms)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application(client_max_size=50 * 1024 * 1024)
        app.router.add_post("/2/httpapi", self._events)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _events(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        now = time.time_ns()
        for event in body.get("events", []):
            sent = event.get("event_properties", {}).get("bench_sent_ns")
            if isinstance(sent, int):
                self.latencies.append((sent / 1e9, (now - sent) / 1e6))
        answer = {"code": 200, "events_ingested": len(body.get("events", [])), "server_upload_time": now // 10**6}
        return web.json_response(answer)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def child_env(config: Config, receiver: Receiver) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        **config.sources,
        **standin_env(f"http://127.0.0.1:{receiver.port}"),
        "DESTINATIONS": "amplitude",
        # Amplitude's documented project-wide limit (the default, 1,000 events/s) is below the rate
        # measured at: lifted, so what is measured is the pipeline, not a queue before the limit.
        "AMPLITUDE_EVENTS_PER_SECOND": "1000000",
    }


def produce_steadily(config: Config, rate: int, seconds: float) -> int:
    """`rate` events a second for `seconds`, in 10 ms ticks, each stamped with its produce time."""
    producer = config.kafka.producer()
    topic = config.names.raw
    rng = random.Random(11)
    sent = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            event = bench_event(rng, sent)
            event["properties"]["bench_sent_ns"] = time.time_ns()
            producer.produce(topic, orjson.dumps(event), event["userId"])
            sent += 1
        producer.poll(0)
        time.sleep(0.01)
    producer.flush(30)
    return sent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_broker(broker: LoopbackBroker, args: argparse.Namespace, log_dir: Path) -> tuple[float, float, float]:
    config = bench_config(broker, args.partitions, DESTINATIONS="amplitude")
    create_all(config)
    receiver = Receiver()
    receiver.start()
    env = child_env(config, receiver)
    normaliser = Role(["--log-level", "WARNING", "normalize"], env, log_dir / "normalize.log")
    sink = Role(["--log-level", "WARNING", "sink", "amplitude"], env, log_dir / "sink.log")
    try:
        time.sleep(5.0)  # both join their groups before the traffic starts
        started = time.time()
        sent = produce_steadily(config, args.rate, args.seconds)
        deadline = time.monotonic() + 30
        while len(receiver.latencies) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        sink.terminate()
        normaliser.terminate()
        receiver.stop()
    steady = [ms for sent_at, ms in receiver.latencies if sent_at >= started + WARM_UP_SECONDS]
    if not steady:
        raise SystemExit(f"nothing arrived; see {log_dir}")
    p50, p99, worst = percentile(steady, 0.5), percentile(steady, 0.99), max(steady)
    print(
        f"{describe(broker.kind)}: {len(receiver.latencies):,}/{sent:,} "
        f"arrived; after {WARM_UP_SECONDS:.0f} s warm-up, {len(steady):,} events: "
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms (at {args.rate:,} events/s)"
    )
    return p50, p99, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=2000, help="events per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--partitions", type=int, default=6)
    add_broker_option(parser)
    args = parser.parse_args()
    on_each_broker(args.broker, "latency-bench-", lambda broker, log_dir: run_broker(broker, args, log_dir))


if __name__ == "__main__":
    main()
