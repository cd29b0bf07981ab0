"""One role as several processes of its consumer group: `normalize --processes N`, `sink D --processes N`.

A CPython process does one core's work at most (one GIL), so a role that is CPU-bound scales by
processes. Each process here is an ordinary member of the role's consumer group, the same as one
more replica: Kafka spreads the partitions over them (so one person's events, one partition, stay
with one member and in order), and the offsets each commits are its own. What this module adds is
one command for N of them:

- each member is `python -m worker <the same arguments without --processes>`, with
  `SEGMENT_WORKER_MEMBER` (0..N-1, in its log lines) and, when METRICS_PORT is set, its own
  METRICS_PORT + index for `/metrics`, `/healthz` and `/readyz`;
- SIGTERM or SIGINT to the supervisor is passed to every member (by PID), and the supervisor exits
  once they all have: 0 when every member stopped cleanly, else the worst exit code;
- a member that exits by itself is started again after a backoff (1 s, doubling to 30 s while it
  keeps failing within a minute of starting), except for a configuration error (exit code 2),
  which no restart cures: then the others are stopped and the supervisor exits 2;
- a member whose supervisor is gone (killed with -9) stops itself (`watch_supervisor`), so no
  member outlives it.

More members than partitions sit idle, as replicas do (docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from worker import logs
from worker.config_loader import CONFIG_EXIT_CODE

MEMBER_ENV = "SEGMENT_WORKER_MEMBER"
SUPERVISOR_ENV = "SEGMENT_WORKER_SUPERVISOR_PID"
PROCESSES_OPTION = "--processes"
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a member that ran this long before exiting starts again after FIRST_BACKOFF
STOP_TIMEOUT = 60.0  # a member's graceful stop (it drains its requests); then SIGKILL
POLL = 0.2

log = logs.get("worker.members")


def member_arguments(argv: Sequence[str]) -> list[str]:
    """The command's arguments (after the program) without `--processes N` / `--processes=N`."""
    kept: list[str] = []
    skip = False
    for argument in argv:
        if skip:
            skip = False
        elif argument == PROCESSES_OPTION:
            skip = True
        elif not argument.startswith(f"{PROCESSES_OPTION}="):
            kept.append(argument)
    return kept


def member_environment(environ: Mapping[str, str], index: int, metrics_port: int | None) -> dict[str, str]:
    env = {**environ, MEMBER_ENV: str(index), SUPERVISOR_ENV: str(os.getpid())}
    if metrics_port:  # 0 (any free port) stays 0 for every member
        env["METRICS_PORT"] = str(metrics_port + index)
    return env


class _Member:
    __slots__ = ("backoff", "index", "process", "restart_at", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = FIRST_BACKOFF
        self.restart_at: float | None = None


class Supervisor:
    """Runs `count` members of one role until told to stop; see the module's docstring."""

    def __init__(self, arguments: Sequence[str], count: int, metrics_port: int | None) -> None:
        self.command = [sys.executable, "-m", "worker", *arguments]
        self.metrics_port = metrics_port
        self.members = [_Member(index) for index in range(count)]
        self._stop = threading.Event()

    def install_signal_handlers(self) -> None:
        def handler(_signum: int, _frame: object) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def stop(self) -> None:
        """Stop every member (SIGTERM by PID); `run` returns once they have exited."""
        self._stop.set()
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for member in self.members:
            self._start(member)
        while not self._stop.is_set():
            now = time.monotonic()
            for member in self.members:
                if member.restart_at is not None:
                    if now >= member.restart_at:
                        self._start(member)
                    continue
                assert member.process is not None
                code = member.process.poll()
                if code is None or self._stop.is_set():
                    continue
                if code == CONFIG_EXIT_CODE:
                    log.error("member refused its configuration; stopping", member=member.index, exit_code=code)
                    self.stop()
                    return self._wait_all(CONFIG_EXIT_CODE)
                if now - member.started >= STABLE_AFTER:
                    member.backoff = FIRST_BACKOFF  # it had been running: not a crash loop
                delay = member.backoff
                member.backoff = min(delay * 2, MAX_BACKOFF)
                member.restart_at = now + delay
                log.warning("member exited; starting it again", member=member.index, exit_code=code, after_s=delay)
            self._stop.wait(POLL)
        return self._wait_all(0)

    def _start(self, member: _Member) -> None:
        env = member_environment(os.environ, member.index, self.metrics_port)
        member.process = subprocess.Popen(self.command, env=env)
        member.started = time.monotonic()
        member.restart_at = None
        log.info("member started", member=member.index, pid=member.process.pid)

    def _wait_all(self, code: int) -> int:
        """Wait for every member to exit (SIGKILL after STOP_TIMEOUT); the worst exit code, or `code`."""
        worst = code
        deadline = time.monotonic() + STOP_TIMEOUT
        for member in self.members:
            process = member.process
            if process is None:
                continue
            try:
                exit_code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("member did not stop in time; killing it", member=member.index, pid=process.pid)
                process.kill()
                exit_code = process.wait()
            if member.restart_at is None and exit_code != 0 and worst == 0:
                worst = exit_code if exit_code > 0 else 1  # killed by a signal
        return worst


def watch_supervisor(stop: Callable[[], None]) -> None:
    """In a member: call `stop` once if its supervisor dies (the member is re-parented)."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return
    parent = int(supervisor)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("supervisor is gone; stopping", supervisor_pid=parent)
        stop()

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
