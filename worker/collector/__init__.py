"""`segment-worker collect`: a Segment-compatible HTTP API (and Jitsu's `/api/v1/segment`) into
`segment.raw`, for Segment's server, mobile and browser SDKs (CORS for analytics.js in a page).

One request becomes one Kafka message an event (a batch's events each in a one-event envelope,
merged with the batch's fields), keyed by the event's userId else anonymousId, stamped with
`receivedAt` and `context.ip`, and is answered 200 only after Kafka acknowledged all of them
(acks=all); a request with any message the broker did not acknowledge is answered 503 so the SDK
retries it.

Modules: `settings` (COLLECTOR_*), `auth` (write keys), `client_ip` (trusted proxies), `body`
(bounded reading and gunzip), `payloads` (validation and stamping), `responses` (status codes and
bodies), `cors` (browsers' cross-origin rules), `writer` (librdkafka bridged to asyncio),
`metrics`, `app` (routes), `server` (process lifecycle).
"""
