"""Realistic sample traffic for `demo`, tests and benchmarks: several users, every event type, web and
mobile user agents, public IPs, a batch envelope with shared context, and poison input."""

from __future__ import annotations

import random
from typing import Any

import orjson

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.43 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "analytics-ios/4.1.8",
]
# Public addresses of well-known services (only looked up in the geo database, never contacted).
PUBLIC_IPS = [
    "8.8.8.8",
    "81.2.69.142",
    "1.1.1.1",
    "185.60.216.35",
    "151.101.1.140",
    "203.0.113.7",
    "2.16.154.0",
    "91.198.174.192",
    "104.16.132.229",
    "133.242.0.1",
]


def user_events(
    user: str, anonymous: str, ip: str, user_agent: str, start: str = "2026-11-22T10:00:00"
) -> list[dict[str, Any]]:
    """One visitor's session: anonymous page views, an identify, tracks, a screen, a group and an alias."""
    context = {
        "ip": ip,
        "userAgent": user_agent,
        "locale": "en-US",
        "library": {"name": "analytics.js", "version": "4.1.0"},
    }
    ts = [f"{start}.{i:03d}Z" for i in range(8)]
    return [
        {
            "type": "page",
            "anonymousId": anonymous,
            "name": "Pricing",
            "properties": {"path": "/pricing"},
            "context": context,
            "timestamp": ts[0],
            "messageId": f"{anonymous}-page-1",
        },
        {
            "type": "identify",
            "userId": user,
            "anonymousId": anonymous,
            "context": context,
            "timestamp": ts[1],
            "traits": {"email": f"{user}@example.com", "firstName": user.title(), "plan": "pro"},
            "messageId": f"{user}-identify",
        },
        {
            "type": "track",
            "userId": user,
            "anonymousId": anonymous,
            "event": "Order Completed",
            "context": context,
            "properties": {"revenue": 19.99, "currency": "USD", "productId": "sku-1", "quantity": 1},
            "timestamp": ts[2],
            "messageId": f"{user}-order",
        },
        {
            "type": "track",
            "anonymousId": anonymous,
            "event": "Video Played",
            "properties": {"value": 3},
            "context": context,
            "timestamp": ts[3],
            "messageId": f"{anonymous}-video",
        },
        {
            "type": "screen",
            "userId": user,
            "name": "Settings",
            "context": {
                **context,
                "device": {"id": f"dev-{user}", "type": "ios", "model": "iPhone15,2"},
                "os": {"name": "iOS", "version": "17.1"},
            },
            "timestamp": ts[4],
            "messageId": f"{user}-screen",
        },
        {
            "type": "group",
            "userId": user,
            "groupId": "acme",
            "traits": {"name": "Acme Inc", "plan": "enterprise"},
            "context": context,
            "timestamp": ts[5],
            "messageId": f"{user}-group",
        },
        {
            "type": "alias",
            "userId": user,
            "previousId": f"old-{user}",
            "context": context,
            "timestamp": ts[6],
            "messageId": f"{user}-alias",
        },
    ]


def sample_payloads(users: int = 4) -> tuple[list[tuple[str, bytes]], int, list[bytes]]:
    """(key, raw payload) pairs to write to segment.raw, how many good events they hold, and the poison payloads."""
    payloads: list[tuple[str, bytes]] = []
    good = 0
    for i in range(users):
        user, anonymous = f"user-{i}", f"anon-{i}"
        events = user_events(user, anonymous, PUBLIC_IPS[i % len(PUBLIC_IPS)], USER_AGENTS[i % len(USER_AGENTS)])
        good += len(events)
        if i % 2 == 0:  # half the users arrive one event a message, half as a batch envelope
            payloads.extend((e.get("userId") or e["anonymousId"], orjson.dumps(e)) for e in events)
        else:
            batch = {
                "batch": [{k: v for k, v in e.items() if k != "context"} for e in events],
                "context": events[0]["context"],
                "sentAt": "2026-11-22T10:00:01.000Z",
            }
            payloads.append((user, orjson.dumps(batch)))
    poison = [
        b'{"type": "track", "userId": "u", "event": ',
        b"\xff\xfe not utf-8",
        orjson.dumps({"type": "track", "userId": "u"}),
    ]
    payloads.extend(("poison", p) for p in poison)
    return payloads, good, poison


def bench_event(rng: random.Random, n: int) -> dict[str, Any]:
    """A ~1.5 KB track event with a realistic UA and public-IP mix (for bench/)."""
    user = f"user-{rng.randrange(5000)}"
    return {
        "type": "track",
        "event": rng.choice(["Product Viewed", "Product Added", "Order Completed", "Signed In"]),
        "userId": user,
        "anonymousId": f"anon-{user}",
        "messageId": f"bench-{n}",
        "timestamp": "2026-11-22T10:00:00.000Z",
        "sentAt": "2026-11-22T10:00:01.000Z",
        "properties": {
            "product_id": f"sku-{rng.randrange(1000)}",
            "price": round(rng.uniform(1, 300), 2),
            "quantity": rng.randrange(1, 5),
            "category": "Games",
            "name": "Monopoly: 3rd Edition",
            "brand": "Hasbro",
            "variant": "200 pieces",
            "coupon": "MAYDEALS",
            "position": 3,
            "url": "https://www.example.com/product/path",
            "image_url": "https://www.example.com/product/path.jpg",
        },
        "context": {
            "ip": rng.choice(PUBLIC_IPS[:-1])
            if rng.random() < 0.9
            else f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "userAgent": rng.choice(USER_AGENTS[:6]),
            "locale": "en-US",
            "timezone": "Europe/London",
            "library": {"name": "analytics.js", "version": "4.1.0"},
            "page": {
                "path": "/product/path",
                "referrer": "https://www.google.com/",
                "search": "?q=monopoly",
                "title": "Monopoly: 3rd Edition | Example Store",
                "url": "https://www.example.com/product/path?q=monopoly",
            },
            "campaign": {
                "name": "TPS Innovation Newsletter",
                "source": "Newsletter",
                "medium": "email",
                "term": "tps reports",
                "content": "image link",
            },
            "screen": {"width": 1920, "height": 1080, "density": 2},
        },
    }
