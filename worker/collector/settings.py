"""Collector knobs (`COLLECTOR_*`), the accepted write keys among them."""

from __future__ import annotations

import ipaddress
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from worker.config_loader import Section, split_csv

# Loopback only: behind a proxy, operators name its addresses; nobody else may claim a client IP.
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")
ANY_ORIGIN = "*"


class CollectorSettings(Section):
    env_prefix: ClassVar[str] = "COLLECTOR_"

    # Accepted write keys (comma-separated). A collector with none would answer every request 401.
    write_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    # Peers whose X-Forwarded-For / X-Real-IP headers are believed (CIDRs, comma-separated).
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_TRUSTED_PROXIES))
    # Bytes on the wire (compressed or not) a request may carry before it is refused unread with 413.
    # Larger than Segment's 500 KB batch limit, so a plain body just over that limit still gets
    # Segment's own 400 answer; the decompressed payload is bounded by Segment's limits regardless.
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # How long a request waits for the broker's acknowledgement before it is answered 503.
    ack_timeout_seconds: float = Field(default=10.0, gt=0)
    # Requests waiting for an acknowledgement at once; more are answered 503 (bounds memory while
    # the broker is slow: at most this many requests' events are queued in librdkafka, each event
    # <= 32 KB with its batch's context merged in; the producer's queue.buffering.max.messages
    # bounds the count of events as well).
    max_in_flight: int = Field(default=1000, gt=0)
    # On SIGTERM: how long in-flight requests may take to finish, then how long the producer may flush.
    shutdown_timeout_seconds: float = Field(default=20.0, gt=0)
    # How long a client may take to send a request's headers (from connecting, or from the first
    # byte of its next request on a kept-alive connection), and then its body: past that the
    # connection is answered 408 and closed, so clients that stall (slowloris) cannot hold
    # connections open. Finite and positive: there is no "never".
    read_timeout_seconds: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    # Web pages allowed to post from a browser (analytics.js posts cross-origin, so the browser asks
    # first and shows the page an answer only when it names the page's origin): `*` (any page; a
    # write key is public in a page anyway), or comma-separated origins (`https://shop.example`),
    # or empty (no browser may post). See worker/collector/cors.py.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [ANY_ORIGIN])

    @field_validator("write_keys", mode="before")
    @classmethod
    def _parse_write_keys(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_cidrs(cls, value: object) -> object:
        value = split_csv(value)
        if isinstance(value, list):
            for cidr in value:
                ipaddress.ip_network(cidr, strict=False)  # raises ValueError: a typo must not start
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: object) -> object:
        value = split_csv(value)
        if isinstance(value, list):
            if ANY_ORIGIN in value and len(value) > 1:
                raise ValueError(f"`{ANY_ORIGIN}` allows every origin; list origins or give `{ANY_ORIGIN}` alone")
            for origin in value:
                if origin != ANY_ORIGIN:
                    check_origin(origin)
        return value


def check_origin(origin: object) -> None:
    """An origin as browsers send it in `Origin`: scheme://host[:port], lower case, nothing after.
    Anything else could never match a request, so a typo (a trailing slash, a path) refuses to start."""
    if not isinstance(origin, str):
        return  # left to the field's type
    parsed = urlsplit(origin)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path or parsed.query or parsed.fragment:
        raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path or trailing slash)")
    if origin != origin.lower() or parsed.username is not None or parsed.password is not None:
        raise ValueError(f"{origin!r} is not an origin as browsers send it (lower case, no user info)")
    parsed.port  # noqa: B018  raises ValueError for a port outside 0-65535
