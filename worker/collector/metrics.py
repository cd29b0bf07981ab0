"""The collector's Prometheus counters (the shared ones live in worker.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

REQUESTS = Counter(
    "segment_worker_collector_requests_total",
    "Collector requests answered, by endpoint and status",
    ["endpoint", "status"],
)
EVENTS = Counter(
    "segment_worker_collector_events_total", "Events written to the raw topic and acknowledged", ["endpoint"]
)
WRITE_FAILURES = Counter(
    "segment_worker_collector_write_failures_total", "Requests answered 503 because Kafka did not acknowledge"
)
IN_FLIGHT = Gauge("segment_worker_collector_in_flight_requests", "Requests waiting for Kafka's acknowledgement")
READ_TIMEOUTS = Counter(
    "segment_worker_collector_read_timeouts_total",
    "Requests answered 408 (or connections closed) because the client sent headers or body too slowly",
    ["phase"],
)
PREFLIGHTS = Counter(
    "segment_worker_collector_preflights_total",
    "CORS preflights (OPTIONS) from browsers, by endpoint and whether the page's origin is allowed "
    "(COLLECTOR_CORS_ORIGINS); allowed=false is a page whose posts the browser will block",
    ["endpoint", "allowed"],
)
