"""Sink tuning, shared by every destination (SINK_* variables)."""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import Field, model_validator

from worker.config_loader import Section


class SinkSettings(Section):
    env_prefix: ClassVar[str] = "SINK_"

    concurrency: int = Field(default=8, gt=0)  # requests in flight per destination
    request_timeout: float = Field(default=10.0, gt=0)  # seconds for one HTTP request, connect to last byte
    linger_ms: float = Field(default=5.0, ge=0)  # how long a partly filled request may wait for more items
    max_buffered_events: int = Field(default=10_000, gt=0)  # beyond this the sink pauses its partitions
    # Items waiting behind a held user (a retry's backoff, a throttle) count apart from
    # max_buffered_events (so one slow heavy user does not pause everyone), up to this many of one
    # user and max_held_events in all;
    # beyond either they count towards max_buffered_events again. So a sink holds at most
    # max_buffered_events + max_held_events items (plus one consumed batch).
    max_held_per_user: int = Field(default=1_000, gt=0)
    max_held_events: int = Field(default=10_000, gt=0)
    # Transient failures an item may have before it is dead-lettered `exhausted` ...
    max_attempts: int = Field(default=12, gt=0)
    # ... counted only while the destination works for others: after this many requests in a row
    # refused for everyone (5xx, timeouts and connection errors, 401/403, a 429 without per-user
    # detail) it is down (its "circuit" is open, /readyz says so), and then only max_retry_seconds
    # counts, so an outage, a 429 storm or a rejected key pauses the sink instead of dead-lettering
    # everything in flight.
    circuit_open_after: int = Field(default=5, gt=0)
    max_retry_seconds: float = Field(default=3600.0, gt=0)  # ... or this long since its first failure
    backoff_initial: float = Field(default=0.5, gt=0)  # seconds; doubles per attempt, with full jitter
    # The longest wait between two tries: caps the backoff and any Retry-After or API hint too.
    backoff_max: float = Field(default=60.0, gt=0)
    # One user's items go out in the order they were consumed: while one of them is in a request,
    # waiting for a retry or held for a throttle, that user's later items wait behind it (others
    # do not). Off: items are sent as they come, each retried on its own (no order per user).
    per_user_order: bool = True
    throttle_default: float = Field(default=30.0, gt=0)  # a throttled user's pause when the API gives no Retry-After

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Self:
        if self.backoff_max < self.backoff_initial:
            raise ValueError(f"SINK_BACKOFF_MAX ({self.backoff_max}) is below SINK_BACKOFF_INITIAL")
        return self
