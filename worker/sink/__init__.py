"""The shared sink runner: Kafka side (worker.sink.strategy) and delivery engine (worker.sink.delivery)."""
