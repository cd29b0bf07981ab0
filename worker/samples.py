"""Realistic sample traffic for `demo`, tests and benchmarks: several users, every event type, web and
mobile user agents, public IPs, a batch envelope with shared context, and poison input."""

from __future__ import annotations

import bisect
import functools
import ipaddress
import itertools
import random
import uuid
from typing import Any

import orjson

from worker.segment.timestamps import iso_from_millis

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


# -- realistic bench traffic (bench/normalize_throughput.py) ------------------------------------
#
# bench_event above has ten IPs and six user agents, so the normaliser's geo and UA caches hit on
# nearly every event and hide what enrichment costs on real traffic. realistic_event has 5,000
# users, each mostly on their own public IPv4, and ~1,500 distinct user agents in a Zipf-like mix.

REALISTIC_USERS = 5000
USER_AGENT_COUNT = 1500
OWN_IP_SHARE = 0.9  # the rest of a user's events come from a random public address (travel, mobile data)
OWN_UA_SHARE = 0.8  # the rest from another device or browser, drawn from the whole mix
ZIPF_EXPONENT = 1.0
REALISTIC_BASE_MS = 1_795_000_000_000  # 2026-11-18, a fixed "now" so the traffic is reproducible

# Blocks that the bundled DB-IP City Lite places mostly in one country (90-100 % of addresses
# sampled from each, checked against it); the weights are a rough share of a worldwide web audience. Users' own addresses are spread
# over them, so geo lookups hit many distinct database records, as on real traffic.
_HOME_BLOCKS: list[tuple[str, int]] = [
    ("73.0.0.0/8", 8), ("71.0.0.0/8", 6), ("75.0.0.0/8", 5), ("97.0.0.0/8", 5), ("68.0.0.0/8", 4),  # US
    ("79.192.0.0/10", 3), ("87.128.0.0/10", 2), ("80.128.0.0/11", 2),  # DE
    ("86.128.0.0/10", 3), ("81.128.0.0/11", 2), ("92.0.0.0/11", 1), ("86.0.0.0/11", 1),  # GB
    ("90.0.0.0/9", 5),  # FR
    ("83.32.0.0/11", 3),  # ES
    ("79.0.0.0/10", 2), ("93.32.0.0/11", 1), ("151.0.0.0/10", 1),  # IT
    ("83.0.0.0/11", 1), ("89.64.0.0/12", 1),  # PL
    ("95.24.0.0/13", 2),  # RU
    ("78.160.0.0/11", 1), ("88.224.0.0/11", 1),  # TR
    ("106.192.0.0/11", 2), ("49.36.0.0/14", 2), ("157.32.0.0/12", 2), ("223.176.0.0/12", 1), ("182.64.0.0/12", 1),  # IN
    ("126.0.0.0/8", 5),  # JP
    ("59.0.0.0/11", 1), ("125.128.0.0/11", 1), ("218.144.0.0/12", 1),  # KR
    ("36.64.0.0/11", 2), ("114.120.0.0/13", 1),  # ID
    ("14.160.0.0/11", 2),  # VN
    ("1.120.0.0/13", 1), ("110.140.0.0/14", 1), ("120.144.0.0/13", 1),  # AU
    ("174.88.0.0/13", 3),  # CA
    ("189.0.0.0/11", 2), ("200.160.0.0/11", 2), ("177.0.0.0/8", 2),  # BR
    ("187.128.0.0/10", 3),  # MX
    ("181.0.0.0/12", 1),  # AR
    ("41.0.0.0/11", 1),  # ZA
]  # fmt: skip


def _block_bounds() -> tuple[list[tuple[int, int]], list[int]]:
    """(first address, size) of each home block, and their cumulative weights."""
    bounds, cumulative, total = [], [], 0
    for cidr, weight in _HOME_BLOCKS:
        network = ipaddress.IPv4Network(cidr)
        bounds.append((int(network.network_address), network.num_addresses))
        total += weight
        cumulative.append(total)
    return bounds, cumulative


_BLOCKS, _BLOCK_WEIGHTS = _block_bounds()


def random_public_ipv4(rng: random.Random) -> str:
    """A uniformly random globally routable unicast IPv4 address."""
    while True:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            return str(address)


def _chrome_build(major: int) -> int:
    """Roughly Chrome's build number for a major version (120 was 6099; each major adds ~55-60).
    Only the shape matters here: a parser reads the major version, not the build."""
    return 6099 + (major - 120) * 56


def _user_agent_pool() -> list[str]:
    """~1,500 distinct user agents in the shapes real browsers send, most popular first.

    Each gets a score (browser share x how recent the version is x platform share), and the pool is
    ordered by it, so a Zipf draw over ranks puts the newest desktop Chrome on top and old in-app
    WebViews in the tail. Patch numbers are drawn from a fixed seed: the pool is the same every run.
    """
    rng = random.Random(20261118)
    scored: dict[str, float] = {}

    def add(user_agent: str, score: float) -> None:
        scored[user_agent] = max(score, scored.get(user_agent, 0.0))

    def recency(major: int, newest: int, decay: float = 0.72) -> float:
        return decay ** (newest - major)

    chrome = range(109, 132)  # 109: the last for Windows 7/8, which lingers
    chrome_desktop = [
        ("Windows NT 10.0; Win64; x64", 0.62),
        ("Macintosh; Intel Mac OS X 10_15_7", 0.22),
        ("X11; Linux x86_64", 0.05),
        ("X11; CrOS x86_64 14541.0.0", 0.04),
        ("Windows NT 6.1; Win64; x64", 0.01),
    ]
    for major in chrome:
        for platform, share in chrome_desktop:
            if platform.startswith("Windows NT 6.1") and major != 109:
                continue
            # Chrome 110+ sends the reduced form, MAJOR.0.0.0; older ones the full version.
            version = f"{major}.0.0.0" if major >= 110 else f"{major}.0.{_chrome_build(major)}.{rng.randrange(30, 200)}"
            add(
                f"Mozilla/5.0 ({platform}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{version} Safari/537.36",
                0.40 * share * recency(major, 131),
            )
            # Edge (not on ChromeOS): Chrome's reduced token plus its own full build.
            for _ in range(2 if platform.startswith("Windows NT 10") else 0 if "CrOS" in platform else 1):
                edge = f"{major}.0.{2210 + (major - 120) * 60 + rng.randrange(0, 9)}.{rng.randrange(20, 130)}"
                add(
                    f"Mozilla/5.0 ({platform}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.0.0 "
                    f"Safari/537.36 Edg/{edge}",
                    0.05 * share * recency(major, 131),
                )
        # Opera on Windows: Chrome's token plus OPR.
        add(
            f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.0.0 "
            f"Safari/537.36 OPR/{major - 15}.0.0.0",
            0.01 * recency(major, 131),
        )
        # Chrome for Android, reduced form (no device model).
        add(
            f"Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.0.0 "
            "Mobile Safari/537.36",
            0.20 * recency(major, 131),
        )

    android_devices = [
        ("SM-S918B", (13, 14), 1.0), ("SM-S911B", (13, 14), 0.9), ("SM-A546B", (13, 14), 0.8),
        ("SM-A536B", (12, 13, 14), 0.8), ("SM-A146B", (13, 14), 0.6), ("SM-G991B", (12, 13, 14), 0.7),
        ("SM-A256B", (14,), 0.5), ("SM-X200", (13, 14), 0.3), ("Pixel 8", (14,), 0.6),
        ("Pixel 7", (13, 14), 0.6), ("Pixel 6a", (13, 14), 0.4), ("Pixel 8 Pro", (14,), 0.3),
        ("M2101K6G", (12, 13), 0.4), ("2201117TY", (12, 13), 0.4), ("23021RAAEG", (13, 14), 0.4),
        ("CPH2591", (13, 14), 0.3), ("CPH2451", (13, 14), 0.3), ("RMX3630", (13, 14), 0.3),
        ("moto g54 5G", (13, 14), 0.3), ("motorola edge 40", (13, 14), 0.2), ("V2207", (13,), 0.2),
        ("LE2123", (12, 13), 0.2), ("NE2213", (13, 14), 0.2), ("M2012K11AG", (12, 13), 0.3),
    ]  # fmt: skip
    for model, versions, share in android_devices:
        for android in versions:
            for major in range(118, 132):
                # An app's WebView sends the full Chrome version and the device model.
                full = f"{major}.0.{_chrome_build(major)}.{rng.randrange(40, 220)}"
                add(
                    f"Mozilla/5.0 (Linux; Android {android}; {model} Build/{_android_build(android, rng)}; wv) "
                    f"AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/{full} Mobile Safari/537.36",
                    0.015 * share * recency(major, 131, 0.6),
                )
            if model.startswith("SM-"):
                for samsung in range(21, 27):
                    add(
                        f"Mozilla/5.0 (Linux; Android {android}; SAMSUNG {model}) AppleWebKit/537.36 (KHTML, like Gecko) "
                        f"SamsungBrowser/{samsung}.0 Chrome/{115 + (samsung - 23) * 2}.0.0.0 Mobile Safari/537.36",
                        0.02 * share * recency(samsung, 26, 0.55),
                    )

    ios = [(15, m) for m in range(0, 9)] + [(16, m) for m in range(0, 8)] + [(17, m) for m in range(0, 7)]
    ios += [(18, m) for m in range(0, 2)]
    for major, minor in ios:
        score = recency(major * 10 + minor, 181, 0.8)
        for patch in ("", "_1") if minor < 6 else ("",):
            token = f"{major}_{minor}{patch}"
            version = token.replace("_", ".")
            safari = f"AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{version}"
            add(
                f"Mozilla/5.0 (iPhone; CPU iPhone OS {token} like Mac OS X) {safari} Mobile/15E148 Safari/604.1",
                0.3 * score,
            )
            add(f"Mozilla/5.0 (iPad; CPU OS {token} like Mac OS X) {safari} Mobile/15E148 Safari/604.1", 0.03 * score)
            # Chrome and Firefox on iOS are WebKit with their own tokens.
            first_chrome = 94 + (major - 15) * 12  # the Chrome releases of that iOS's year or so
            for chrome_major in range(max(100, first_chrome), min(132, first_chrome + 14)):
                add(
                    f"Mozilla/5.0 (iPhone; CPU iPhone OS {token} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                    f"CriOS/{chrome_major}.0.{_chrome_build(chrome_major)}.{rng.randrange(40, 200)} Mobile/15E148 Safari/604.1",
                    0.02 * score * recency(chrome_major, 131),
                )
            add(
                f"Mozilla/5.0 (iPhone; CPU iPhone OS {token} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                f"FxiOS/{100 + major * 5 + minor}.0 Mobile/15E148 Safari/605.1.15",
                0.004 * score,
            )
            # In-app browsers: long strings, one per app version, the far tail.
            for _ in range(3):
                app = f"{280 + (major - 15) * 40 + minor * 4 + rng.randrange(4)}.0.0.{rng.randrange(10, 40)}.{rng.randrange(60, 120)}"
                phone = rng.choice(["iPhone13,2", "iPhone14,5", "iPhone14,7", "iPhone15,2", "iPhone15,4", "iPhone16,1"])
                add(
                    f"Mozilla/5.0 (iPhone; CPU iPhone OS {token} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                    f"Mobile/21B101 Instagram {app} ({phone}; iOS {token}; en_US; en; scale=3.00; 1170x2532; "
                    f"{rng.randrange(400_000_000, 600_000_000)})",
                    0.006 * score,
                )

    for version in ["15.6.1", "16.0", "16.1", "16.2", "16.3", "16.4", "16.5", "16.6", "17.0", "17.1",
                    "17.2", "17.3", "17.4", "17.5", "17.6", "18.0", "18.1"]:  # fmt: skip
        major, minor = (int(p) for p in version.split(".")[:2])
        add(
            f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
            f"Version/{version} Safari/605.1.15",
            0.12 * recency(major * 10 + minor, 181, 0.8),
        )

    firefox_platforms = [
        ("Windows NT 10.0; Win64; x64", 0.6),
        ("Macintosh; Intel Mac OS X 10.15", 0.2),
        ("X11; Linux x86_64", 0.1),
        ("X11; Ubuntu; Linux x86_64", 0.1),
    ]
    for major in [115, *range(118, 133)]:  # 115: the ESR that lingers
        for platform, share in firefox_platforms:
            add(
                f"Mozilla/5.0 ({platform}; rv:{major}.0) Gecko/20100101 Firefox/{major}.0",
                0.06 * share * (0.3 if major == 115 else recency(major, 132)),
            )
        add(
            f"Mozilla/5.0 (Android 14; Mobile; rv:{major}.0) Gecko/{major}.0 Firefox/{major}.0",
            0.005 * recency(major, 132),
        )

    bots = [
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.6778.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
        "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
        "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
        "DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/13.1.1 "
        "Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
        "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
        "Twitterbot/1.0",
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/124.0.0.0 Safari/537.36",
        "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
        "Mozilla/5.0 (compatible; PetalBot;+https://webmaster.petalsearch.com/site/petalbot)",
    ]
    for rank, bot in enumerate(bots):
        add(bot, 0.004 / (rank + 1))
    ranked = sorted(scored, key=lambda ua: -scored[ua])
    return ranked[:USER_AGENT_COUNT]


def _android_build(android: int, rng: random.Random) -> str:
    """An Android build id of the shape that release ships (TP1A.220624.014 is Android 13's)."""
    prefix = {12: "SP1A", 13: "TP1A", 14: "UP1A"}[android]
    return f"{prefix}.{210000 + (android - 12) * 10000 + rng.randrange(100, 1231):06d}.{rng.randrange(1, 40):03d}"


USER_AGENT_POOL = _user_agent_pool()
# Zipf over ranks: the k-th most popular user agent is drawn with weight 1/k^s.
_UA_CUMULATIVE = list(itertools.accumulate(1 / (k + 1) ** ZIPF_EXPONENT for k in range(len(USER_AGENT_POOL))))


def zipf_user_agent(rng: random.Random) -> str:
    return rng.choices(USER_AGENT_POOL, cum_weights=_UA_CUMULATIVE)[0]


@functools.cache
def realistic_user(index: int) -> tuple[str, str, str, str, int]:
    """(userId, anonymousId, own public IPv4, own user agent, clock skew ms) of user `index`,
    derived from the index alone: the same user has the same address and device in every run."""
    user = f"user-{index:05d}"
    rng = random.Random(f"realistic-user:{user}")  # str seeds are hashed with SHA-512: stable across runs
    first, size = _BLOCKS[bisect.bisect_left(_BLOCK_WEIGHTS, rng.randrange(_BLOCK_WEIGHTS[-1]) + 1)]
    ip = str(ipaddress.IPv4Address(first + rng.randrange(1, size - 1)))
    anonymous = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    # Most client clocks are close to right; one in five is minutes off, which skew correction fixes.
    skew = rng.randrange(-500, 500) if rng.random() < 0.8 else rng.randrange(-300_000, 300_000)
    return user, anonymous, ip, zipf_user_agent(rng), skew


_EVENT_NAMES = ["Product Viewed", "Product List Viewed", "Product Added", "Cart Viewed", "Checkout Started",
                "Order Completed", "Signed In", "Products Searched", "Promotion Clicked", "Product Removed"]  # fmt: skip
_EVENT_WEIGHTS = [30, 18, 12, 8, 5, 3, 8, 10, 4, 2]
_EDITIONS = ["1st", "2nd", "3rd", "4th", "Classic", "Deluxe", "Travel"]
_CATEGORIES = ["Games", "Books", "Electronics", "Home & Kitchen", "Toys", "Sports", "Beauty", "Garden"]
_LOCALES = [("en-US", "America/New_York"), ("en-GB", "Europe/London"), ("de-DE", "Europe/Berlin"),
            ("fr-FR", "Europe/Paris"), ("ja-JP", "Asia/Tokyo"), ("pt-BR", "America/Sao_Paulo"),
            ("es-ES", "Europe/Madrid"), ("hi-IN", "Asia/Kolkata")]  # fmt: skip


_UA_PLATFORMS = [("Android", "Android"), ("Windows", "Windows"), ("Macintosh", "macOS"), ("CrOS", "Chrome OS"),
                 ("Linux", "Linux")]  # fmt: skip


@functools.cache
def _user_agent_data(user_agent: str) -> dict[str, Any] | None:
    """What analytics.js puts in `context.userAgentData` (navigator.userAgentData, Chromium only)."""
    if "Chrome/" not in user_agent or "CriOS" in user_agent:
        return None
    major = user_agent.split("Chrome/", 1)[1].split(".", 1)[0]
    platform = next(
        (name for token, name in _UA_PLATFORMS if token in user_agent),
        "Unknown",
    )
    brand = "Microsoft Edge" if " Edg/" in user_agent else "Google Chrome"
    return {
        "brands": [
            {"brand": "Chromium", "version": major},
            {"brand": brand, "version": major},
            {"brand": "Not_A Brand", "version": "24"},
        ],
        "mobile": "Mobile" in user_agent,
        "platform": platform,
    }


def realistic_event(rng: random.Random, n: int) -> dict[str, Any]:
    """The n-th of a stream of ~1.5 KB analytics.js track events from REALISTIC_USERS users (for bench/).

    A user's events come from their own address (OWN_IP_SHARE) and device (OWN_UA_SHARE), else a
    random public address and a user agent from the Zipf mix. Timestamps follow the SDK: the
    client's clock (skewed per user) stamps `timestamp` and `sentAt`, the collector's stamps
    `receivedAt`. One event in fifty comes without a messageId and one in twenty without an
    anonymousId (a backend's call), so filling them is exercised. Same rng seed, same stream.
    """
    user, anonymous, own_ip, own_ua, skew = realistic_user(rng.randrange(REALISTIC_USERS))
    user_agent = own_ua if rng.random() < OWN_UA_SHARE else zipf_user_agent(rng)
    at = REALISTIC_BASE_MS + n * 5  # 200 events a second of real time
    sent = at + skew
    locale, timezone = _LOCALES[int(user[-5:]) % len(_LOCALES)]
    product = rng.randrange(5000)
    price = round(rng.uniform(1, 300), 2)
    quantity = rng.randrange(1, 5)
    event: dict[str, Any] = {
        "type": "track",
        "event": rng.choices(_EVENT_NAMES, _EVENT_WEIGHTS)[0],
        "userId": user,
        "anonymousId": anonymous,
        "messageId": f"ajs-next-{rng.getrandbits(128):032x}",
        "timestamp": iso_from_millis(sent - rng.randrange(5, 3000)),  # queued in the browser before sending
        "sentAt": iso_from_millis(sent),
        "receivedAt": iso_from_millis(at + rng.randrange(20, 400)),
        "properties": {
            "product_id": f"sku-{product:05d}",
            "sku": f"G-{product:05d}-{rng.randrange(100):02d}",
            "category": _CATEGORIES[product % len(_CATEGORIES)],
            "name": f"Monopoly: {_EDITIONS[product % len(_EDITIONS)]} Edition",
            "brand": "Hasbro",
            "variant": f"{rng.randrange(1, 5) * 100} pieces",
            "price": price,
            "quantity": quantity,
            "value": round(price * quantity, 2),
            "currency": "USD",
            "affiliation": "Example Store",
            "list_id": f"search-results-{rng.randrange(50)}",
            "coupon": "MAYDEALS" if rng.random() < 0.2 else None,
            "position": rng.randrange(1, 25),
            "url": f"https://www.example.com/product/{product}",
            "image_url": f"https://cdn.example.com/img/{product}.jpg",
        },
        "context": {
            "ip": own_ip if rng.random() < OWN_IP_SHARE else random_public_ipv4(rng),
            "userAgent": user_agent,
            "locale": locale,
            "timezone": timezone,
            "library": {"name": "analytics.js", "version": "npm:next-1.70.0"},
            "page": {
                "path": f"/product/{product}",
                "referrer": "https://www.google.com/",
                "search": f"?q=monopoly&ref={rng.randrange(10_000)}",
                "title": "Monopoly | Example Store",
                "url": f"https://www.example.com/product/{product}?q=monopoly",
            },
            "campaign": {
                "name": "TPS Innovation Newsletter",
                "source": "Newsletter",
                "medium": "email",
                "term": "tps reports",
                "content": "image link",
            },
            "screen": {"width": 1920, "height": 1080, "density": 2, "innerWidth": 1512, "innerHeight": 860},
            "instanceId": f"{rng.getrandbits(128):032x}",
        },
        "integrations": {},
    }
    if (agent_data := _user_agent_data(user_agent)) is not None:
        event["context"]["userAgentData"] = agent_data
    if rng.random() < 0.02:
        del event["messageId"]
    if rng.random() < 0.05:
        del event["anonymousId"]
        event["context"]["library"] = {"name": "analytics-node", "version": "2.1.0"}
    return event
