"""A token bucket for a destination's events-per-second limit (asyncio, single event loop)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else rate  # one second's worth
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    async def take(self, count: int) -> None:
        """Wait until `count` tokens are there (a request larger than the bucket waits for a full bucket)."""
        count_needed = min(count, self.capacity)
        while True:
            self._refill()
            if self.tokens >= count_needed:
                self.tokens -= count
                return
            await asyncio.sleep((count_needed - self.tokens) / self.rate)
