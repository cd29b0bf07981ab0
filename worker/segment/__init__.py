"""The Segment spec: event shapes, batch envelopes, timestamps and ids. Knows nothing about Kafka."""
