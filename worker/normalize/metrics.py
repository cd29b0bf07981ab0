"""The normaliser's own metrics: identity stitching (worker.normalize.stitching).

Apart from worker.metrics, like the collector's, because those are the metrics every role shares
(each has a dashboard panel); these exist only in `segment-worker normalize`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

UNSTITCHED = Counter(
    "segment_worker_unstitched_total",
    "Anonymous events sent without a userId to a destination that needs one",
    ["destination"],
)
STITCHED = Counter(
    "segment_worker_stitched_total",
    "Anonymous events sent with a userId learnt after they arrived (waited, or linked later in their batch)",
)
STITCH_WAITING = Gauge("segment_worker_stitch_waiting_events", "Events waiting for their anonymousId's userId")
