"""The collector's aiohttp application: Segment's HTTP Tracking API and Jitsu's Segment endpoint.

Routes (all in ROUTES): Segment's `/v1/<type>`, `/v1/batch`, `/v1/import`; the short paths the
browser and mobile SDKs post to, `/v1/t|p|i|s|g|a` and `/v1/b`, also without `/v1`; Jitsu's
`/api/v1/segment` and `/api/v1/segment/compat`, each also with `/v1/batch` and `/v1/<type>` after
it. Each answers POST, and OPTIONS for a browser's CORS preflight (before any key check: a
preflight carries none); every answer carries the CORS headers (`worker.collector.cors`).

A request goes: write key (if carried outside the body), Content-Encoding and announced length,
all from the headers alone -> bounded body (in size and time) -> gunzip -> JSON -> write key (if in
the body) -> shape, stamps and limits -> one Kafka message an event, keyed by its user -> 200 only
after the broker acknowledged every one of them, 503 if it did not acknowledge any one. Every 4xx
is decided before the first write, so a refused request writes nothing; a 503 may leave some of
its events stored, which the client's retry writes again (deduplicated by messageId downstream).

A wrong key outside the body is refused before a byte of the body is read, and before a client
that sent `Expect: 100-continue` is invited to send it. When the key can only be in the body, the
work done before it is checked is bounded: at most the payload limit read (an unencoded body) or
COLLECTOR_MAX_BODY_BYTES read and the payload limit inflated (gzip), and one JSON parse.

Every body gets a 2xx or 4xx: what cannot be read, decoded or stored unchanged, or has an event
without a `type` the normaliser knows, is a 400 (401 when no key could be read). A 5xx means the
broker did not acknowledge (503) or a bug of ours (500).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import logs
from worker.collector import metrics
from worker.collector.auth import WriteKeys, key_from_body, key_from_request
from worker.collector.body import IDENTITY, check_length, content_encoding, decode_content, read_wire_body
from worker.collector.client_ip import TrustedProxies, client_ip
from worker.collector.cors import Cors
from worker.collector.deadlines import HeadDeadlines
from worker.collector.payloads import EVENT_TYPES, RawMessage, Shape, build_messages, decode_document, received_at_now
from worker.collector.responses import (
    JITSU_OK,
    SEGMENT_OK,
    HttpError,
    error_response,
    internal_error,
    json_response,
    unauthorized,
    unavailable,
)
from worker.collector.settings import CollectorSettings
from worker.collector.writer import RawWriter, WriteFailed

log = logs.get(__name__)

Handler = Callable[[web.Request], Awaitable[web.Response]]
_READINESS_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Route:
    path: str
    shape: Shape
    event_type: str | None  # set on the event from the path (Segment's typed endpoints)
    ok_body: dict[str, Any]


# analytics.js (analytics-next) posts each call to `<apiHost>/<first letter of its type>`, and its
# batching mode and the mobile SDKs (analytics-swift, analytics-kotlin) post to `<apiHost>/b`,
# where apiHost defaults to `api.segment.io/v1`: so `/v1/t`... for an apiHost that keeps the
# `/v1`, and `/t`... for one given as the bare host.
SHORT_TYPES = {event_type[0]: event_type for event_type in EVENT_TYPES}  # t p i s g a
# What Jitsu's own server routes (jitsucom/jitsu server/routers/router.go), for Segment SDKs told
# to use `https://HOST/api/v1/segment` as their host: the server SDKs (analytics-python, the
# legacy analytics-node, analytics-go) append `/v1/batch` to it.
JITSU_BASES = ("/api/v1/segment", "/api/v1/segment/compat")


def _routes() -> tuple[Route, ...]:
    segment = [
        *(Route(f"/v1/{event_type}", Shape.EVENT, event_type, SEGMENT_OK) for event_type in EVENT_TYPES),
        Route("/v1/batch", Shape.BATCH, None, SEGMENT_OK),
        Route("/v1/import", Shape.BATCH, None, SEGMENT_OK),  # Segment's older name for /v1/batch
    ]
    for prefix in ("/v1", ""):
        segment += [Route(f"{prefix}/{letter}", Shape.EVENT, kind, SEGMENT_OK) for letter, kind in SHORT_TYPES.items()]
        segment.append(Route(f"{prefix}/b", Shape.BATCH, None, SEGMENT_OK))
    jitsu = []
    for base in JITSU_BASES:
        # In Jitsu, `/compat` takes the same Segment JSON but maps it onto Jitsu's deprecated event
        # structure (`eventn_ctx` fields) instead of its JS SDK 2.0 one, for users of the old events
        # API. We keep Segment-spec events whatever the path, so here it is an alias.
        jitsu += [
            # Jitsu takes one event or a `{"batch": [...]}` envelope on both of its paths.
            Route(base, Shape.EITHER, None, JITSU_OK),
            Route(f"{base}/v1/batch", Shape.EITHER, None, JITSU_OK),
            # Not Jitsu's (it has no typed paths), but what Segment's HTTP API documents under the
            # same host, so a client written for it works with the Jitsu base too.
            *(Route(f"{base}/v1/{event_type}", Shape.EVENT, event_type, JITSU_OK) for event_type in EVENT_TYPES),
        ]
    return (*segment, *jitsu)


# Every tracking route, the one table: POST to handle, OPTIONS for browsers' preflights (cors.py).
ROUTES: tuple[Route, ...] = _routes()


class Collector:
    def __init__(
        self,
        write_keys: WriteKeys,
        trusted: TrustedProxies,
        writer: RawWriter,
        settings: CollectorSettings,
        deadlines: HeadDeadlines | None = None,
    ) -> None:
        self.write_keys = write_keys
        self.trusted = trusted
        self.writer = writer
        self.settings = settings
        self.deadlines = deadlines or HeadDeadlines(settings.read_timeout_seconds)
        self.in_flight = 0
        self.accepting = True  # False once shutdown began: readiness fails so load balancers move on

    def handler(self, route: Route) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            return await self.handle(request, route)

        return handle

    def expect_handler(self, route: Route) -> Callable[[web.Request], Awaitable[web.Response | None]]:
        """`Expect: 100-continue`: the client waits for our go-ahead before sending its body, so
        whatever the headers alone refuse (a wrong key, encoding or length) is answered instead of
        the go-ahead, and the body is never sent."""

        async def expect(request: web.Request) -> web.Response | None:
            try:
                self._check_head(request, route)
            except HttpError as rejected:
                # Answered without the middleware: the headers' clock stops here. The client may or
                # may not send the body now, so the connection is not reused.
                self.deadlines.started(request)
                self.deadlines.finished(request)
                response = self._refusal(route, rejected)
                response.force_close()
                metrics.REQUESTS.labels(route.path, str(response.status)).inc()
                return response
            return await _continue(request)

        return expect

    async def handle(self, request: web.Request, route: Route) -> web.Response:
        try:
            messages = await self._accept(request, route)
            if messages:
                await self._store(messages)
                metrics.EVENTS.labels(route.path).inc(len(messages))
            response = json_response(200, route.ok_body)
        except HttpError as rejected:
            response = self._refusal(route, rejected)
        except Exception:
            log.exception("request failed", path=route.path)
            response = error_response(internal_error())
        metrics.REQUESTS.labels(route.path, str(response.status)).inc()
        if response.status == 408:
            metrics.READ_TIMEOUTS.labels("body").inc()
            return await _answer_and_close(request, response)
        return response

    @staticmethod
    def _refusal(route: Route, rejected: HttpError) -> web.Response:
        log_rejection = log.warning if rejected.status >= 500 else log.debug
        log_rejection("request refused", path=route.path, status=rejected.status, reason=rejected.message)
        return error_response(rejected)

    def _check_head(self, request: web.Request, route: Route) -> tuple[str | None, str]:
        """What the request line and headers alone decide, before a byte of the body is read: the
        key carried outside the body (401 when wrong), the encoding (415), the announced length
        (413; Segment's 400 for an unencoded body over the payload limit). Returns the outer key
        (None: it can only be in the body) and the encoding."""
        outer_key = key_from_request(request.headers, request.query)
        if outer_key is not None and not self.write_keys.accepts(outer_key):
            raise unauthorized()
        encoding = content_encoding(request.headers.get("Content-Encoding"))
        check_length(request.content_length, self.settings.max_body_bytes, _body_is_payload(encoding, route))
        return outer_key, encoding

    async def _accept(self, request: web.Request, route: Route) -> list[RawMessage]:
        outer_key, encoding = self._check_head(request, route)
        wire = await read_wire_body(
            request,
            self.settings.max_body_bytes,
            self.settings.read_timeout_seconds,
            payload_limit=_body_is_payload(encoding, route),
        )
        payload = decode_content(wire, encoding, route.shape.payload_limit)
        try:
            document = decode_document(payload)
        except HttpError:
            if outer_key is None:  # no key anywhere we can read: say no more than that
                raise unauthorized() from None
            raise
        if outer_key is None and not self.write_keys.accepts(key_from_body(document)):
            raise unauthorized()
        ip = client_ip(
            request.remote, request.headers.get("X-Forwarded-For"), request.headers.get("X-Real-IP"), self.trusted
        )
        return build_messages(document, route.shape, route.event_type, received_at_now(), ip)

    async def _store(self, messages: list[RawMessage]) -> None:
        if self.in_flight >= self.settings.max_in_flight:
            raise unavailable(f"{self.in_flight} requests are already waiting for Kafka")
        self.in_flight += 1
        metrics.IN_FLIGHT.set(self.in_flight)
        try:
            await self.writer.write_all([(message.value, message.key) for message in messages])
        except WriteFailed as failed:
            metrics.WRITE_FAILURES.inc()
            raise unavailable(str(failed)) from None
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.set(self.in_flight)

    # -- operations -------------------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # the loop answered, so it is turning

    async def readyz(self, _request: web.Request) -> web.Response:
        if not self.accepting:
            return web.Response(status=503, text="not ready: shutting down\n")
        loop = asyncio.get_running_loop()
        available = await loop.run_in_executor(None, self.writer.topic_available, _READINESS_TIMEOUT_SECONDS)
        if not available:
            return web.Response(status=503, text=f"not ready: no metadata for {self.writer.topic}\n")
        return web.Response(text="ready\n")

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _body_is_payload(encoding: str, route: Route) -> int | None:
    """The payload limit when the body is the payload itself (not compressed): no more of it is read."""
    return route.shape.payload_limit if encoding == IDENTITY else None


async def _continue(request: web.Request) -> None:
    """aiohttp's default answer to `Expect`: `100 Continue` for HTTP/1.1 `100-continue`, else 417."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect[:40]}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim response is not part of the answer's size


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection: its client stopped sending mid-body, and
    aiohttp would otherwise linger, waiting for the rest of it."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # after what was written is flushed
    return response


COLLECTOR: web.AppKey[Collector] = web.AppKey("collector", Collector)
HEAD_DEADLINES: web.AppKey[HeadDeadlines] = web.AppKey("head_deadlines", HeadDeadlines)


def make_app(collector_settings: CollectorSettings, writer: RawWriter) -> web.Application:
    write_keys = WriteKeys(key.get_secret_value() for key in collector_settings.write_keys)
    cors = Cors(collector_settings.cors_origins)
    deadlines = HeadDeadlines(collector_settings.read_timeout_seconds, cors.headers_without_request())
    trusted = TrustedProxies(collector_settings.trusted_proxies)
    collector = Collector(write_keys, trusted, writer, collector_settings, deadlines)
    # Bodies are read by `read_wire_body` with the collector's own bound; this is aiohttp's backstop.
    app = web.Application(client_max_size=collector_settings.max_body_bytes + 1, middlewares=[deadlines.middleware()])
    app[COLLECTOR] = collector
    app[HEAD_DEADLINES] = deadlines
    # Every answer of the application, errors and aiohttp's 404/405 included, gets the CORS headers.
    app.on_response_prepare.append(cors.add_headers)
    for route in ROUTES:
        app.router.add_post(route.path, collector.handler(route), expect_handler=collector.expect_handler(route))
        app.router.add_route("OPTIONS", route.path, cors.preflight)
    app.router.add_get("/healthz", collector.healthz)
    app.router.add_get("/readyz", collector.readyz)
    app.router.add_get("/metrics", collector.metrics)
    return app


class _Runner(web.AppRunner):
    """aiohttp's runner, except that its sites serve every connection behind the app's head
    deadlines (`worker.collector.deadlines`): sites take their protocol factory from `server`."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._deadlines = app[HEAD_DEADLINES]

    @property
    def server(self) -> Any:
        server = super().server
        return None if server is None else self._deadlines.wrap(server)


def make_runner(app: web.Application, collector_settings: CollectorSettings) -> web.AppRunner:
    return _Runner(
        app,
        # Off so that `worker.collector.body` sees gzip bodies as sent and bounds their inflation.
        auto_decompress=False,
        access_log=None,  # an access log line would carry `?writeKey=` query strings
        shutdown_timeout=collector_settings.shutdown_timeout_seconds,
        # After an answer given without reading the whole body (a 401 before the body, a 413),
        # aiohttp reads and drops the rest for this long, so the client sees the answer rather
        # than a reset; bounded by the same read timeout as everything else a client sends.
        lingering_time=collector_settings.read_timeout_seconds,
    )
