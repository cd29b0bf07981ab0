"""Destination name -> its module's factory (each reads its own AMPLITUDE_* / AMBERFLO_* ... settings)."""

from __future__ import annotations

from worker.destinations import amberflo, amplitude, brevo, reteno
from worker.destinations.base import Destination

FACTORIES = {"amplitude": amplitude.make, "amberflo": amberflo.make, "reteno": reteno.make, "brevo": brevo.make}


def make_destination(name: str) -> Destination:
    try:
        factory = FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown destination {name!r}; known: {', '.join(FACTORIES)}") from None
    return factory()  # type: ignore[return-value]
