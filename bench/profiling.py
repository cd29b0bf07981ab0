"""py-spy around a role under a bench: `--profile DIR` in the bench scripts.

It samples only the threads holding the GIL (`--gil`), so the stacks show where the process spends
its CPU in Python, not where its threads wait; `--format raw` writes folded stacks (one line a
stack, then its sample count), which `flamegraph.pl`, speedscope or a few lines of Python read.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RATE = 250  # samples a second: enough for a run of a few seconds, little overhead


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling process `pid` until `stop_profiler`, its folded stacks written to `output`."""
    py_spy = Path(sys.executable).with_name("py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [str(py_spy), "record", "--pid", str(pid), "--rate", str(RATE), "--gil", "--format", "raw"]
    print(f"  profiling pid {pid} into {output}", flush=True)
    return subprocess.Popen([*command, "-o", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    """Stop py-spy; it writes its output when interrupted."""
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


@contextmanager
def profiled(pid: int, output: Path | None) -> Iterator[None]:
    """py-spy on `pid` for the block, into `output`; nothing when `output` is None (no --profile)."""
    profiler = start_profiler(pid, output) if output is not None else None
    try:
        yield
    finally:
        if profiler is not None:
            stop_profiler(profiler)
