"""The shared sink runner: Kafka side (worker.sink.app) and delivery engine (worker.sink.delivery)."""
