"""Destinations: one module each, holding pure functions `event -> items`, `items -> request` and
`response -> outcome`. The sink runner (batching, HTTP, retries, rate limit, DLQ) is shared."""
