"""Every topic and consumer group the product uses, named in one place.

Topics are `TOPIC_PREFIX` + `raw`, `identities`, `dest.<destination>`, `dlq.<destination>` (and
`dlq.raw` for the normaliser's rejects); consumer groups are `CONSUMER_GROUP_PREFIX` + a role name.
Operators, dashboards and KEDA triggers rely on these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

NORMALIZE_ROLE = "normalize"
RAW = "raw"  # the dead-letter "destination" of the normaliser's rejects (`dlq raw`)


@dataclass(frozen=True)
class Names:
    topic_prefix: str = "segment."
    group_prefix: str = "segment-"

    @property
    def raw(self) -> str:
        return f"{self.topic_prefix}raw"

    @property
    def identities(self) -> str:
        return f"{self.topic_prefix}identities"

    def dest(self, destination: str) -> str:
        return f"{self.topic_prefix}dest.{destination}"

    def dlq(self, destination: str) -> str:
        """A destination's dead-letter topic; `dlq("raw")` holds the normaliser's rejects."""
        return f"{self.topic_prefix}dlq.{destination}"

    def replay_target(self, destination: str) -> str:
        """Where a dead letter goes back to when it names no original topic."""
        return self.raw if destination == RAW else self.dest(destination)

    def group(self, role: str) -> str:
        return f"{self.group_prefix}{role}"

    def full_topic(self, name: str) -> str:
        """`raw` or `dest.brevo` -> the prefixed topic; a name that already has the prefix is kept."""
        return name if name.startswith(self.topic_prefix) else f"{self.topic_prefix}{name}"


def sink_role(destination: str) -> str:
    return f"sink-{destination}"
