"""Prometheus metrics every role shares. Names are part of the contract with deploy/ dashboards and alerts."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONSUMED = Counter("segment_worker_consumed_total", "Messages consumed", ["topic"])
PRODUCED = Counter("segment_worker_produced_total", "Messages produced and acknowledged", ["topic"])
DEAD_LETTERED = Counter("segment_worker_dead_lettered_total", "Messages dead-lettered", ["destination", "kind"])
FILTERED = Counter("segment_worker_filtered_total", "Events deliberately not forwarded", ["reason"])
ASSIGNED_PARTITIONS = Gauge("segment_worker_assigned_partitions", "Partitions assigned to this process")
PAUSED_PARTITIONS = Gauge("segment_worker_paused_partitions", "Partitions paused for backpressure")
CONSUMER_LAG = Gauge(
    "segment_worker_consumer_lag", "Messages behind the partition's end (librdkafka statistics)", ["topic", "partition"]
)
OFFSET_GAPS = Counter(
    "segment_worker_offset_gaps_total",
    "Jumps forward in a partition's consumed offsets (worker.kafka.offsets)",
    ["topic"],
)
OFFSETS_SKIPPED = Counter("segment_worker_offsets_skipped_total", "Offsets inside those jumps, not consumed", ["topic"])
OFFSETS_RECOVERED = Counter(
    "segment_worker_offsets_recovered_total",
    "Offsets a consumer was not given at first and was given when it read the partition again",
    ["topic"],
)
REBALANCES = Counter("segment_worker_rebalances_total", "Rebalance callbacks", ["kind"])
COMMITS = Counter("segment_worker_commits_total", "Synchronous commits (revoke, shutdown)", ["reason"])
BATCH_SIZE = Histogram(
    "segment_worker_consume_batch_size", "Messages per consume() batch", buckets=(1, 10, 50, 100, 250, 500, 1000)
)
DELIVERED = Counter("segment_worker_delivered_total", "Items a destination accepted", ["destination"])
RETRIED = Counter("segment_worker_retried_total", "Items scheduled for another attempt", ["destination"])
HTTP_RESPONSES = Counter(
    "segment_worker_http_responses_total",
    "Destination responses by status ('error' = no response)",
    ["destination", "status"],
)
REQUEST_SECONDS = Histogram(
    "segment_worker_request_seconds",
    "Destination request latency",
    ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OUTSTANDING = Gauge("segment_worker_sink_outstanding_items", "Items handed to the delivery engine, not yet finished")
