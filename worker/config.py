"""The product's configuration: the core settings, the Kafka properties, and `Config`, which builds
every other settings object (sink, collector, each destination's) from the same sources.

Variable names are the public contract (docs/CONTRACT.md). How values are read and checked is
worker.config_loader's job; which destinations exist is worker.destinations.registry's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from worker.collector.settings import CollectorSettings
from worker.config_loader import ConfigError, Section, Sources, read_sources, split_csv
from worker.destinations import registry
from worker.destinations.base import Destination
from worker.dlq.settings import DlqSettings
from worker.kafka.clients import KafkaClients
from worker.names import Names
from worker.sink.settings import SinkSettings

# Environment variables that start with KAFKA_ but are settings of ours, not librdkafka properties.
_OWN_KAFKA_VARIABLES = {"KAFKA_BOOTSTRAP_SERVERS"}
# librdkafka properties whose values are credentials (masked wherever properties are shown).
_SECRET_PROPERTY_WORDS = ("password", "secret", "token", "key")


class Settings(Section):
    """The core settings every role shares."""

    kafka_bootstrap_servers: str = Field(default="127.0.0.1:9092", min_length=1)
    topic_prefix: str = "segment."
    # Consumer groups are "<prefix>normalize" and "<prefix>sink-<destination>".
    consumer_group_prefix: str = "segment-"
    destinations: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(registry.names()))
    topic_partitions: int = Field(default=6, gt=0)
    topic_replication_factor: int = Field(default=1, gt=0)

    geoip_database: str | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # Normaliser tuning.
    identity_cache_size: int = Field(default=1_000_000, gt=0)
    ua_cache_size: int = Field(default=65_536, ge=0)
    ip_cache_size: int = Field(default=65_536, ge=0)
    consume_batch_size: int = Field(default=1000, gt=0)
    max_in_flight: int = Field(default=50_000, gt=0)
    # How long an anonymous event with no known link waits for one before going to a destination
    # that needs a userId (docs/ARCHITECTURE.md#identity-stitching); 0 disables. Capped so that
    # the wait stays short next to a drain or a rebalance, which give waiting events their time.
    normalize_stitch_wait_ms: int = Field(default=2000, ge=0, le=60_000)

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: object) -> object:
        value = split_csv(value)
        if isinstance(value, list):
            known = registry.names()
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"unknown destinations {unknown}; known: {', '.join(known)}")
        return value

    @property
    def names(self) -> Names:
        return Names(self.topic_prefix, self.consumer_group_prefix)


def sections() -> tuple[type[Section], ...]:
    """Every settings class of the product, each destination's included (docs, deploy checks)."""
    return (Settings, SinkSettings, CollectorSettings, DlqSettings, *(e.config for e in registry.entries()))


def kafka_properties(sources: Sources, bootstrap_servers: str) -> dict[str, str]:
    """librdkafka properties: bootstrap servers plus every other `KAFKA_<PROPERTY>` variable."""
    props = {"bootstrap.servers": bootstrap_servers}
    for name, value in sources.items():
        if name.startswith("KAFKA_") and name not in _OWN_KAFKA_VARIABLES and len(name) > len("KAFKA_"):
            props[name[len("KAFKA_") :].lower().replace("_", ".")] = value
    return props


def masked(properties: Mapping[str, str]) -> dict[str, str]:
    """Properties as they may be shown: credential values replaced by ***."""
    return {k: "***" if any(w in k for w in _SECRET_PROPERTY_WORDS) else v for k, v in properties.items()}


@dataclass(frozen=True)
class Config:
    """Everything a role is configured with, read once from one set of sources."""

    sources: Mapping[str, str]
    settings: Settings
    kafka: KafkaClients = field(repr=False)

    @classmethod
    def from_sources(cls, sources: Mapping[str, str]) -> Config:
        upper = {name.upper(): value for name, value in sources.items()}
        settings = Settings.from_sources(upper)
        properties = kafka_properties(upper, settings.kafka_bootstrap_servers)
        return cls(upper, settings, KafkaClients(properties, settings.consumer_group_prefix))

    @property
    def names(self) -> Names:
        return self.settings.names

    def __repr__(self) -> str:  # never the sources themselves: they hold every credential
        return f"Config(settings={self.settings!r}, kafka={masked(self.kafka.properties)!r})"

    def with_settings(self, **changes: Any) -> Config:
        """The same configuration with some core settings changed (e.g. `topics create --partitions`)."""
        return Config(self.sources, self.settings.model_copy(update=changes), self.kafka)

    def sink(self) -> SinkSettings:
        return SinkSettings.from_sources(self.sources)

    def dlq(self) -> DlqSettings:
        return DlqSettings.from_sources(self.sources)

    def collector(self) -> CollectorSettings:
        return CollectorSettings.from_sources(self.sources)

    def destination_config(self, name: str) -> Section:
        return registry.get(name).config.from_sources(self.sources)

    def destination(self, name: str, *, require_key: bool = True) -> Destination:
        """The destination `name`, configured; refuses to build one without its credential."""
        entry = registry.get(name)
        config = entry.config.from_sources(self.sources)
        if require_key and not entry.credential(config):
            raise ConfigError(f"{entry.key_variable} is not set: the {name} sink needs its API key")
        return entry.make(config)


def load_config(environ: Mapping[str, str], config_file: str | None = None) -> Config:
    """The CLI's one read of the configuration: `environ` over the dotenv file over defaults."""
    return Config.from_sources(read_sources(environ, config_file))
