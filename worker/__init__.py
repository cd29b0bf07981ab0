"""segment-worker: Segment-spec events from Kafka, normalised, enriched and delivered."""

__version__ = "0.1.0"
