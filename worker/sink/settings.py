"""Sink tuning, shared by every destination (SINK_* variables)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class SinkSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SINK_", extra="ignore", case_sensitive=False)

    concurrency: int = 8  # requests in flight per destination
    request_timeout: float = 10.0  # seconds for one HTTP request, connect to last byte
    linger_ms: float = 50.0  # how long a partly filled request may wait for more items
    max_buffered_events: int = 10_000  # beyond this the sink pauses its partitions (bounded memory)
    max_attempts: int = 12  # transient failures an item may have before it is dead-lettered `exhausted`
    # ... counted only while the destination works for others: after this many failed requests in a
    # row it is down (its "circuit" is open, /readyz says so), and then only max_retry_seconds counts,
    # so an outage pauses the sink instead of dead-lettering everything in flight.
    circuit_open_after: int = 5
    max_retry_seconds: float = 3600.0  # ... or this long since its first failure, whichever comes first
    backoff_initial: float = 0.5  # seconds; doubles per attempt, with full jitter
    backoff_max: float = 60.0
    throttle_default: float = 30.0  # a throttled user's pause when the API gives no Retry-After
