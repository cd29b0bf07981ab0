"""Child processes of `demo` and the tests: each role as its own `python -m worker ...` process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


class Role:
    """A running `segment-worker` command, stopped by its PID."""

    program: tuple[str, ...] = ("-m", "worker")  # what the interpreter runs; a subclass may run a script

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path | None = None) -> None:
        self.args = args
        self.log_path = log_path
        command = [sys.executable, *self.program, *args]
        # The child keeps its own copy of the log's descriptor: ours is closed once it started.
        with open(log_path, "ab") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def kill(self) -> None:
        """kill -9: no chance to commit or flush."""
        if self.alive():
            self.process.kill()
        self.process.wait()
