"""What the delivery engine tells the sink strategy, through one channel, from its own thread.

Every item handed to the engine gets exactly one outcome: `Delivered`, `Failed` (dead-letter it)
or `Withdrawn` (its partition was revoked: the new owner redoes it). The items one request
delivered come in one `DeliveredReport` (the common case, so one report a request, not one an
item); every other outcome in an `ItemReport` of its own.
Changes of the destination's circuit state travel the same channel as `CircuitReport`, and of
how many items wait for held users as `HoldReport`, so the loop's thread never reads the engine's
attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.dlq.headers import Kind


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    kind: Kind
    reason: str
    attempts: int
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Withdrawn:
    reason: str


ItemOutcome = Delivered | Failed | Withdrawn
DELIVERED = Delivered()


@dataclass(frozen=True, slots=True)
class ItemReport:
    owner: Any  # what the strategy attached to the item when it submitted it
    outcome: ItemOutcome


@dataclass(frozen=True, slots=True)
class DeliveredReport:
    """The owners of the items one request delivered, each once."""

    owners: list[Any]


@dataclass(frozen=True, slots=True)
class CircuitReport:
    """The destination is failing for everyone (`open`), or works again."""

    open: bool
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class HoldReport:
    """How many items waiting for a held user (a retry's backoff, a throttle) count apart from the
    shared buffer: the caller's backpressure leaves these out. Sent whenever the number changes."""

    held: int


Report = DeliveredReport | ItemReport | CircuitReport | HoldReport
