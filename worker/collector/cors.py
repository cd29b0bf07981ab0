"""CORS, so that analytics.js in a web page can post to the collector from the page's own origin.

A browser lets a page read the answer to a cross-origin request only when the answer names the
page's origin in `Access-Control-Allow-Origin`; without it the page sees a network error, so
analytics.js keeps the event and sends it again (a duplicate, when the collector had stored it).
analytics-next also sends an `Authorization` header (and `X-Retry-Count` when it resends), which
makes the browser ask first with a preflight `OPTIONS` carrying no credentials at all: that one is
answered before any key check, allowing POST and the headers it asked for.

So every answer of the tracking routes carries the CORS headers, errors included (a 401, 400,
413 or 503 the page cannot read looks like a dropped connection, and is resent), and so do
aiohttp's own 404 and 405: everything but the operations endpoints (`/healthz`, `/readyz`,
`/metrics`), which no page has reason to read.

COLLECTOR_CORS_ORIGINS picks the pages: `*` (the default) allows any, which is safe here because
no cookie or other ambient credential is involved (the write key is in the request, and public in
the page's source anyway); a list allows only those origins, echoed back with `Vary: Origin` so a
cache does not hand one origin's answer to another; an empty list allows none.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping, Sequence

from aiohttp import web

from worker.collector import metrics
from worker.collector.settings import ANY_ORIGIN

OPERATIONS_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))
ALLOWED_METHODS = "POST, OPTIONS"
# How long a browser may reuse a preflight's answer for the same URL (Chromium caps it at 2 h,
# Firefox at 24 h): without it every event would cost two requests.
PREFLIGHT_MAX_AGE_SECONDS = 86400
# RFC 9110 field-name tokens: a requested header that is not one is dropped rather than echoed.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}")
_MAX_ECHOED_HEADERS = 50


class Cors:
    def __init__(self, origins: Sequence[str]) -> None:
        self.any_origin = list(origins) == [ANY_ORIGIN]
        self.origins = frozenset(origins) if not self.any_origin else frozenset()

    def allowed_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for a request from `origin`, None for none."""
        if self.any_origin:
            return ANY_ORIGIN
        return origin if origin is not None and origin in self.origins else None

    def headers(self, origin: str | None) -> dict[str, str]:
        """What every answer to a request from `origin` carries."""
        headers: dict[str, str] = {}
        allowed = self.allowed_origin(origin)
        if allowed is not None:
            headers["Access-Control-Allow-Origin"] = allowed
        if not self.any_origin:
            # The answer depends on Origin (listed or not): caches must key on it, including the
            # answers without CORS headers, or a listed origin could be served an unlisted one's.
            headers["Vary"] = "Origin"
        return headers

    def headers_without_request(self) -> dict[str, str]:
        """For an answer written before the request's headers were read (worker.collector.deadlines'
        408): only what does not depend on the Origin header."""
        return self.headers(None)

    async def preflight(self, request: web.Request) -> web.Response:
        """`OPTIONS` on a tracking route: 204, allowing POST and the headers the browser asked for.
        No key check (a preflight never carries one) and nothing read or written. The origin
        headers are added by `add_headers`, like on every other answer; for an origin not allowed
        there are none, and the browser does not send the POST."""
        headers: dict[str, str] = {}
        allowed = self.allowed_origin(request.headers.get("Origin")) is not None
        # Not counted in the requests counter: a preflight is no tracking request, and browsers
        # send one per URL at most every PREFLIGHT_MAX_AGE_SECONDS.
        resource = request.match_info.route.resource  # one of ROUTES: bounded label values
        endpoint = resource.canonical if resource is not None else request.path
        metrics.PREFLIGHTS.labels(endpoint, str(allowed).lower()).inc()
        if allowed:
            headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            requested = requested_headers(request.headers.get("Access-Control-Request-Headers"))
            if requested:
                # Echoed rather than `*`: the wildcard does not cover `Authorization`, the one
                # header analytics.js needs (Fetch standard, CORS-preflight fetch).
                headers["Access-Control-Allow-Headers"] = ", ".join(requested)
            headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_SECONDS)
        return web.Response(status=204, headers=headers)

    async def add_headers(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """aiohttp's `on_response_prepare` signal: runs for every answer the application gives,
        the handlers' own, their errors and aiohttp's 404/405/417 alike."""
        if request.path in OPERATIONS_PATHS:
            return
        for name, value in self.headers(request.headers.get("Origin")).items():
            if name == "Vary":
                add_vary(response.headers, value)
            else:
                response.headers[name] = value


def requested_headers(header: str | None) -> list[str]:
    """The header names an `Access-Control-Request-Headers` asks for, lower case, valid ones only."""
    if not header:
        return []
    names: list[str] = []
    for part in header.split(","):
        name = part.strip().lower()
        if _HEADER_NAME.fullmatch(name) and name not in names:
            names.append(name)
        if len(names) >= _MAX_ECHOED_HEADERS:
            break
    return names


def add_vary(headers: MutableMapping[str, str], value: str) -> None:
    """Add `value` to a response's `Vary`, keeping what is there."""
    existing = headers.get("Vary")
    present = [item.strip().lower() for item in (existing or "").split(",") if item.strip()]
    if value.lower() not in present and "*" not in present:
        headers["Vary"] = f"{existing}, {value}" if existing else value
