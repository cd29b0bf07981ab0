"""The one list of destinations. Everything that needs to know which destinations exist reads it:
settings validation, the CLI's choices, the topic specs, the demo, the stand-ins server, the tests
and the benches.

An entry names the destination's mapping module factory (`make`), its settings class (a `Section`
with its own variable prefix), which field holds its credential, and its stand-in module (imported
only by whoever serves stand-ins). docs/DESTINATIONS.md says how to add one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pydantic import SecretStr

from worker.config_loader import ConfigError, Section
from worker.destinations import amberflo, amplitude, brevo, reteno
from worker.destinations.base import Destination


@dataclass(frozen=True)
class DestinationEntry:
    name: str
    config: type[Section]  # its settings, read from `config.env_prefix` + FIELD variables
    make: Callable[[Any], Destination]  # config -> the destination (worker.destinations.base)
    standin: str  # module of its local stand-in (worker.standins.*): `register(app, state, key)`
    key_field: str = "api_key"  # the config field that holds its credential
    # It cannot use an event without a userId (skips it, or bills it to the anonymous id): the
    # normaliser gives such an event a short wait for its identity link (worker.normalize.stitching).
    needs_user_id: bool = False

    @property
    def key_variable(self) -> str:
        return self.config.variable(self.key_field)

    def credential(self, config: Section) -> str:
        value = getattr(config, self.key_field)
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        return value or ""

    def standin_module(self) -> ModuleType:
        return importlib.import_module(self.standin)


_ENTRIES: dict[str, DestinationEntry] = {}


def register(entry: DestinationEntry) -> DestinationEntry:
    if entry.name in _ENTRIES or not entry.name.isidentifier() or entry.name == "raw":
        raise ValueError(f"cannot register destination {entry.name!r}: taken or not a plain name")
    _ENTRIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """For tests that register a throwaway destination."""
    _ENTRIES.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_ENTRIES)


def entries() -> tuple[DestinationEntry, ...]:
    return tuple(_ENTRIES.values())


def get(name: str) -> DestinationEntry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ConfigError(f"unknown destination {name!r}; known: {', '.join(_ENTRIES)}") from None


register(DestinationEntry("amplitude", amplitude.AmplitudeConfig, amplitude.make, "worker.standins.amplitude"))
register(
    DestinationEntry("amberflo", amberflo.AmberfloConfig, amberflo.make, "worker.standins.amberflo", needs_user_id=True)
)
register(
    DestinationEntry(
        "reteno", reteno.RetenoConfig, reteno.make, "worker.standins.reteno", "access_key", needs_user_id=True
    )
)
register(DestinationEntry("brevo", brevo.BrevoConfig, brevo.make, "worker.standins.brevo", needs_user_id=True))
