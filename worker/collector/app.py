"""The collector's aiohttp application: Segment's HTTP Tracking API and Jitsu's Segment endpoint.

A request goes: write key (if carried outside the body) -> bounded body -> gunzip -> JSON ->
write key (if in the body) -> shape, stamps and limits -> one Kafka message -> 200 only after the
broker acknowledged it. Any refusal happens before the write, so nothing is ever half-written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import logs
from worker.collector import metrics
from worker.collector.auth import WriteKeys, key_from_body, key_from_request
from worker.collector.body import decode_content, read_wire_body
from worker.collector.client_ip import TrustedProxies, client_ip
from worker.collector.payloads import EVENT_TYPES, RawMessage, Shape, build_message, decode_document, received_at_now
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


ROUTES: tuple[Route, ...] = (
    *(Route(f"/v1/{event_type}", Shape.EVENT, event_type, SEGMENT_OK) for event_type in EVENT_TYPES),
    Route("/v1/batch", Shape.BATCH, None, SEGMENT_OK),
    Route("/v1/import", Shape.BATCH, None, SEGMENT_OK),  # Segment's older name for /v1/batch
    # Jitsu's Segment-compatible endpoint takes one event or a `{"batch": [...]}` envelope.
    Route("/api/v1/segment", Shape.EITHER, None, JITSU_OK),
    # In Jitsu, `/compat` takes the same Segment JSON but maps it onto Jitsu's deprecated event
    # structure (`eventn_ctx` fields) instead of its JS SDK 2.0 one, for users of the old events
    # API. We keep Segment-spec events whatever the path, so here it is an alias.
    Route("/api/v1/segment/compat", Shape.EITHER, None, JITSU_OK),
)


class Collector:
    def __init__(
        self, write_keys: WriteKeys, trusted: TrustedProxies, writer: RawWriter, settings: CollectorSettings
    ) -> None:
        self.write_keys = write_keys
        self.trusted = trusted
        self.writer = writer
        self.settings = settings
        self.in_flight = 0
        self.accepting = True  # False once shutdown began: readiness fails so load balancers move on

    def handler(self, route: Route) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            return await self.handle(request, route)

        return handle

    async def handle(self, request: web.Request, route: Route) -> web.Response:
        try:
            message = await self._accept(request, route)
            if message is not None:
                await self._store(message)
                metrics.EVENTS.labels(route.path).inc(message.events)
            response = json_response(200, route.ok_body)
        except HttpError as rejected:
            log_rejection = log.warning if rejected.status >= 500 else log.debug
            log_rejection("request refused", path=route.path, status=rejected.status, reason=rejected.message)
            response = error_response(rejected)
        except Exception:
            log.exception("request failed", path=route.path)
            response = error_response(internal_error())
        metrics.REQUESTS.labels(route.path, str(response.status)).inc()
        return response

    async def _accept(self, request: web.Request, route: Route) -> RawMessage | None:
        # A key outside the body is checked before the body is even read.
        outer_key = key_from_request(request.headers, request.query)
        if outer_key is not None and not self.write_keys.accepts(outer_key):
            raise unauthorized()
        wire = await read_wire_body(request, self.settings.max_body_bytes)
        payload = decode_content(wire, request.headers.get("Content-Encoding"), route.shape.payload_limit)
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
        return build_message(document, route.shape, route.event_type, received_at_now(), ip)

    async def _store(self, message: RawMessage) -> None:
        if self.in_flight >= self.settings.max_in_flight:
            raise unavailable(f"{self.in_flight} requests are already waiting for Kafka")
        self.in_flight += 1
        metrics.IN_FLIGHT.set(self.in_flight)
        try:
            await self.writer.write(message.value, message.key)
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


COLLECTOR: web.AppKey[Collector] = web.AppKey("collector", Collector)


def make_app(collector_settings: CollectorSettings, writer: RawWriter) -> web.Application:
    write_keys = WriteKeys(key.get_secret_value() for key in collector_settings.write_keys)
    collector = Collector(write_keys, TrustedProxies(collector_settings.trusted_proxies), writer, collector_settings)
    # Bodies are read by `read_wire_body` with the collector's own bound; this is aiohttp's backstop.
    app = web.Application(client_max_size=collector_settings.max_body_bytes + 1)
    app[COLLECTOR] = collector
    for route in ROUTES:
        app.router.add_post(route.path, collector.handler(route))
    app.router.add_get("/healthz", collector.healthz)
    app.router.add_get("/readyz", collector.readyz)
    app.router.add_get("/metrics", collector.metrics)
    return app


def make_runner(app: web.Application, collector_settings: CollectorSettings) -> web.AppRunner:
    return web.AppRunner(
        app,
        # Off so that `worker.collector.body` sees gzip bodies as sent and bounds their inflation.
        auto_decompress=False,
        access_log=None,  # an access log line would carry `?writeKey=` query strings
        shutdown_timeout=collector_settings.shutdown_timeout_seconds,
    )
