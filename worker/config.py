"""Settings: one pydantic-settings model with the variable names of DESIGN.md's public contract.

Precedence: environment, then the optional config file (dotenv format, same names) named by
`SEGMENT_WORKER_CONFIG` or `--config`, then defaults.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ALL_DESTINATIONS = ("amplitude", "amberflo", "reteno", "brevo")

# Environment variables that start with KAFKA_ but are settings of ours, not librdkafka properties.
_OWN_KAFKA_VARS = {"KAFKA_BOOTSTRAP_SERVERS"}


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "segment."
    # Consumer groups are "<prefix>normalize" and "<prefix>sink-<destination>".
    consumer_group_prefix: str = "segment-"
    destinations: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(ALL_DESTINATIONS))
    topic_partitions: int = 6
    topic_replication_factor: int = 1

    # Destination settings (AMPLITUDE_*, AMBERFLO_*, RETENO_*, BREVO_*) live with each destination
    # module in worker/destinations/, so a destination's knobs sit beside the code that uses them.

    collector_write_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    geoip_database: str | None = None
    metrics_port: int | None = None

    # Normaliser tuning.
    identity_cache_size: int = 1_000_000
    ua_cache_size: int = 65_536
    ip_cache_size: int = 65_536
    consume_batch_size: int = 1000
    max_in_flight: int = 50_000

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list):
            unknown = sorted(set(value) - set(ALL_DESTINATIONS))
            if unknown:
                raise ValueError(f"unknown destinations {unknown}; known: {', '.join(ALL_DESTINATIONS)}")
        return value

    @field_validator("collector_write_keys", mode="before")
    @classmethod
    def _parse_write_keys(cls, value: object) -> object:
        return _split_csv(value)

    def group(self, role: str) -> str:
        return f"{self.consumer_group_prefix}{role}"

    def topic(self, name: str) -> str:
        """Full topic name: `raw`, `identities`, `dest.amplitude`, `dlq.raw` ... with the prefix."""
        return f"{self.topic_prefix}{name}"

    @cached_property
    def kafka_properties(self) -> dict[str, str]:
        """librdkafka properties: bootstrap servers plus every other `KAFKA_<PROPERTY>` variable."""
        props = {"bootstrap.servers": self.kafka_bootstrap_servers}
        for name, value in os.environ.items():
            upper = name.upper()
            if upper.startswith("KAFKA_") and upper not in _OWN_KAFKA_VARS:
                props[upper[len("KAFKA_") :].lower().replace("_", ".")] = value
        return props


def load_settings(config_file: str | None = None) -> Settings:
    path = config_file or os.environ.get("SEGMENT_WORKER_CONFIG")
    if path:
        return Settings(_env_file=path)  # type: ignore[call-arg]
    return Settings()
