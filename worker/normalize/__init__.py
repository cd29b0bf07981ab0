"""The normaliser: raw Segment payloads in, normalised and enriched events out, one topic per destination."""
