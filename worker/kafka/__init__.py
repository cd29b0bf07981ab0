"""The Kafka layer: consumer loop, producer, admin and the embedded broker. Knows nothing about Segment."""
