"""The client's IP for `context.ip`: the socket peer, or what a trusted proxy says it forwarded.

Forwarding headers are only believed from peers in COLLECTOR_TRUSTED_PROXIES (default loopback),
otherwise any client could claim any address. `X-Forwarded-For` is read from the right, skipping
our own trusted proxies, and the first address not trusted is the client; when every hop is
trusted that is the left-most one. (Taking the left-most blindly, as Jitsu does, would let a
client put an arbitrary address in front of the header that our proxy appends to.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TrustedProxies:
    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]

    def trusts(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def parse_address(text: str | None) -> IPAddress | None:
    """An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:80`; IPv4-mapped
    IPv6 (`::ffff:1.2.3.4`, what a dual-stack socket reports) becomes the IPv4 address."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_ip(
    peer: str | None,
    forwarded_for: str | None,
    real_ip: str | None,
    trusted: TrustedProxies,
) -> str | None:
    peer_address = parse_address(peer)
    if peer_address is None:
        return None
    if not trusted.trusts(peer_address):
        return str(peer_address)
    forwarded = _from_forwarded_for(forwarded_for, trusted)
    if forwarded is not None:
        return str(forwarded)
    real = parse_address(real_ip)
    return str(real if real is not None else peer_address)


def _from_forwarded_for(header: str | None, trusted: TrustedProxies) -> IPAddress | None:
    if not header:
        return None
    hops = [parse_address(hop) for hop in header.split(",")]
    if not hops or any(hop is None for hop in hops):
        return None  # a garbled header is ignored as a whole rather than half-believed
    addresses = [hop for hop in hops if hop is not None]
    for hop in reversed(addresses):
        if not trusted.trusts(hop):
            return hop
    return addresses[0]
