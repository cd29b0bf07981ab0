"""Fault injection and the record of what each stand-in accepted.

Control API (JSON), served by the stand-in app for tests and operators:
- `POST /_standin/{dest}/faults`   body = Faults fields to set; `{}` resets
- `GET  /_standin/{dest}/received` accepted items by the API's dedupe key, in arrival order
  (`?keys`: only the keys; `?prefix=P`, repeatable: only the items whose key starts with P)
- `GET  /_standin/{dest}/stats`    requests by status code, duplicates suppressed
- `POST /_standin/{dest}/reset`    forget everything
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# The generic error text of a status storm (each stand-in puts it in its API's error shape).
STORM_ERRORS = {
    401: "unauthorized",
    403: "forbidden",
    429: "too many requests",
    500: "internal server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}


@dataclass
class Faults:
    error_rate: float = 0.0  # fraction of requests answered 500/502/503
    timeout_rate: float = 0.0  # fraction of requests that hang for `timeout_seconds` and then 504
    timeout_seconds: float = 30.0
    latency_seconds: float = 0.0  # every request is answered this much later (a slow API)
    throttle_requests: int = 0  # the next N requests get 429 with Retry-After
    retry_after: float = 1.0
    throttled_users: list[str] = field(default_factory=list)  # per-user throttling (Amplitude 429 body)
    poison_ids: list[str] = field(default_factory=list)  # dedupe ids the API rejects as invalid
    down: bool = False  # every request gets 503 (an outage)
    # Every request gets this status until the faults are reset (a 429 storm, a 401 storm ...), in
    # the stand-in API's own error shape; a 429 or 503 carries `retry_after` as its API says it.
    status_storm: int = 0
    # The stand-in refuses every key as its API refuses a wrong one (a revoked key): Amplitude's 400
    # "Invalid API key", 401 for the others.
    reject_key: bool = False
    seed: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class StandinState:
    """Per-destination state: faults to inject, accepted items keyed by dedupe id, counters."""

    name: str
    faults: Faults = field(default_factory=Faults)
    received: dict[str, Any] = field(default_factory=dict)  # dedupe id -> accepted item
    statuses: Counter[int] = field(default_factory=Counter)
    duplicates: int = 0
    requests: int = 0
    _rng: random.Random = field(default_factory=random.Random)

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)

    def reset(self) -> None:
        self.set_faults(Faults())
        self.received.clear()
        self.statuses.clear()
        self.duplicates = 0
        self.requests = 0

    def accept(self, dedupe_id: str, item: Any) -> None:
        if dedupe_id in self.received:
            self.duplicates += 1
        else:
            self.received[dedupe_id] = item

    async def injected_failure(self) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """A request-level fault to answer with (status, body, headers), or None to serve normally.

        The body is the generic one; a stand-in may replace it with its API's documented body.
        """
        self.requests += 1
        f = self.faults
        if f.latency_seconds > 0:
            await asyncio.sleep(f.latency_seconds)
        if f.down:
            return 503, {"error": "service unavailable"}, {}
        if f.status_storm:
            status = f.status_storm
            headers = {"Retry-After": f"{f.retry_after:g}"} if status in (429, 503) else {}
            return status, {"error": STORM_ERRORS.get(status, f"HTTP {status}")}, headers
        if f.throttle_requests > 0:
            f.throttle_requests -= 1
            return 429, {"error": "too many requests"}, {"Retry-After": f"{f.retry_after:g}"}
        if f.timeout_rate and self._rng.random() < f.timeout_rate:
            await asyncio.sleep(f.timeout_seconds)
            return 504, {"error": "gateway timeout"}, {}
        if f.error_rate and self._rng.random() < f.error_rate:
            return self._rng.choice((500, 502, 503)), {"error": "internal server error"}, {}
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "received": len(self.received),
            "duplicates": self.duplicates,
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "faults": asdict(self.faults),
        }
