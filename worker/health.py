"""`/metrics`, `/healthz`, `/readyz` on METRICS_PORT, served from a daemon thread.

Liveness means the worker's loop is still turning (it calls `beat()` every iteration); readiness
means it has partitions assigned (or, for roles without a consumer group, that it said so).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class Health:
    def __init__(self, stall_after: float = 60.0) -> None:
        self.stall_after = stall_after
        self.ready = False
        self.ready_reason = "starting"
        self.blocked: str | None = None  # e.g. "amplitude is failing": not ready even when assigned
        self._last_beat = time.monotonic()

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready = ready
        self.ready_reason = reason

    def set_blocked(self, reason: str | None) -> None:
        """Mark the role unready for a reason of its own (a destination's circuit is open), or clear it."""
        self.blocked = reason

    def is_ready(self) -> bool:
        return self.ready and self.blocked is None

    def readiness(self) -> str:
        if self.blocked is not None:
            return f"not ready: {self.blocked}"
        return f"{'ready' if self.ready else 'not ready'}: {self.ready_reason}"

    def alive(self) -> bool:
        return time.monotonic() - self._last_beat < self.stall_after


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = HEALTH.alive()
            self._send(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
        elif path == "/readyz":
            self._send(200 if HEALTH.is_ready() else 503, f"{HEALTH.readiness()}\n".encode())
        else:
            self._send(404, b"not found\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(port: int | None, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
    if port is None:
        return None
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
