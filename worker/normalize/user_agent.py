"""User-agent enrichment: `context.userAgent` -> `context.device`, `context.os`, `context.browser`, `context.bot`.

Each of device/os/browser is filled only when the event has none (Jitsu's rule, docs/MAPPINGS.md#jitsu:
a mobile SDK's own device and os data is better than anything parsed from a string). Parsing costs
~30 us, so results are cached by UA string; real traffic has few distinct user agents.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ua_parser import parse

# Automation that ua-parser does not call a spider, but that no analytics user wants counted as a person.
_BOT_BROWSERS = {"HeadlessChrome", "PhantomJS", "Puppeteer", "Lighthouse"}
_MOBILE_OS = {"iOS", "Android", "Windows Phone", "KaiOS", "BlackBerry OS"}
_TABLET_WORDS = ("iPad", "Tablet", "Tab", "Kindle", "Nexus 7", "Nexus 9", "Nexus 10")


def _version(part: Any) -> str | None:
    numbers = [n for n in (part.major, part.minor, part.patch) if n]
    return ".".join(numbers) or None


def _parsed(user_agent: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None, bool]:
    result = parse(user_agent)
    agent, os_, device = result.user_agent, result.os, result.device
    # ua-parser marks crawlers with device family "Spider". Segment SDK agents ("analytics-ios/4.1")
    # parse to nothing at all, so they are never flagged.
    bot = (device is not None and device.family == "Spider") or (agent is not None and agent.family in _BOT_BROWSERS)
    os_info = {"name": os_.family, **({"version": v} if (v := _version(os_)) else {})} if os_ else None
    browser = {"name": agent.family, **({"version": v} if (v := _version(agent)) else {})} if agent else None
    device_info: dict[str, Any] | None = None
    if bot:
        device_info = {"type": "bot"}
    elif device is not None or os_ is not None:
        family = device.family if device else ""
        if any(word in family for word in _TABLET_WORDS):
            kind = "tablet"
        elif os_ is not None and os_.family in _MOBILE_OS:
            kind = "mobile"
        else:
            kind = "desktop"
        device_info = {"type": kind}
        if device is not None and device.brand and device.brand not in ("Generic", "Generic_Android"):
            device_info["manufacturer"] = device.brand
        if device is not None and device.model:
            device_info["model"] = device.model
    elif browser is not None:
        device_info = {"type": "desktop"}
    return device_info, os_info, browser, bot


class UserAgentEnricher:
    def __init__(self, cache_size: int = 65_536) -> None:
        self.parse = lru_cache(maxsize=cache_size)(_parsed)

    def __call__(self, event: dict[str, Any]) -> None:
        context = event["context"]
        user_agent = context.get("userAgent")
        if not isinstance(user_agent, str) or not user_agent:
            return
        if len(user_agent) > 1024:  # bound what the cache keys on; real user agents are far shorter
            user_agent = user_agent[:1024]
        device, os_info, browser, bot = self.parse(user_agent)
        if device and not context.get("device"):
            context["device"] = dict(device)
        if os_info and not context.get("os"):
            context["os"] = dict(os_info)
        if browser and not context.get("browser"):
            context["browser"] = dict(browser)
        if bot:
            context["bot"] = True
