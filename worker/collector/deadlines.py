"""Read deadlines: a client has COLLECTOR_READ_TIMEOUT_SECONDS to send a request's headers, then as
long again for its body (`worker.collector.body.read_wire_body`); past either, it is answered 408
and its connection closed. Without them a client that connects and sends nothing, sends its
headers a byte at a time or stops mid-body (slowloris) holds a connection, a file descriptor and
memory for as long as it likes.

aiohttp has no such deadline: its keep-alive timer closes a connection idle *between* requests,
and only its newest releases also arm it for a connection's first request (at 75 s, however
slowly the headers trickle in). So every connection's protocol is wrapped (`HeadDeadlines.wrap`,
installed by the runner in `worker.collector.app`) and its clock runs:

- from the moment the connection is made, until a request's headers are complete;
- on a kept-alive connection, from the first byte of the next request (an idle kept-alive
  connection is aiohttp's keep-alive timer's business, as before).

A request's handler starting (the middleware) stops the clock. When it runs out, the connection
gets a 408 if it had sent part of a request, and is closed either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from worker.collector import metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HeadDeadlines:
    def __init__(self, timeout: float, answer_headers: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        # Added to the 408 written here, outside aiohttp: the CORS headers that need no request
        # (worker.collector.cors), so a page whose request stalled can read why.
        self.answer_headers = dict(answer_headers or {})
        self._connections: dict[asyncio.BaseTransport, _Deadlined] = {}

    def wrap(self, factory: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server`: `factory`'s protocols behind a deadline."""

        def make() -> asyncio.Protocol:
            return _Deadlined(factory(), self)

        return make

    def started(self, request: web.BaseRequest) -> None:
        """The request's headers are in and it is being handled: its connection's clock stops."""
        connection = self._connections.get(request.transport) if request.transport is not None else None
        if connection is not None:
            connection.request_started()

    def finished(self, request: web.BaseRequest) -> None:
        connection = self._connections.get(request.transport) if request.transport is not None else None
        if connection is not None:
            connection.request_finished()

    def middleware(self) -> Any:
        @web.middleware
        async def stop_the_clock(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.started(request)
            try:
                return await handler(request)
            finally:
                self.finished(request)

        return stop_the_clock


class _Deadlined(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a clock on each request's headers."""

    def __init__(self, inner: asyncio.Protocol, deadlines: HeadDeadlines) -> None:
        self._inner = inner
        self._deadlines = deadlines
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._partial = False  # bytes of a request arrived since the clock started

    # -- asyncio.Protocol, forwarded ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._deadlines._connections[transport] = self
        self._inner.connection_made(transport)
        self._start_clock()  # a new connection owes us a request's headers

    def data_received(self, data: bytes) -> None:
        if not self._in_request:
            self._partial = True
            if self._timer is None:  # the first byte of the next request on a kept-alive connection
                self._start_clock()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        if self._transport is not None:
            self._deadlines._connections.pop(self._transport, None)
        self._inner.connection_lost(exc)

    # -- the clock ---------------------------------------------------------------------------

    def request_started(self) -> None:
        self._in_request = True
        self._partial = False
        self._stop_clock()

    def request_finished(self) -> None:
        self._in_request = False

    def _start_clock(self) -> None:
        self._stop_clock()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._deadlines.timeout, self._expired)

    def _stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing() or self._in_request:
            return
        metrics.READ_TIMEOUTS.labels("headers").inc()
        if self._partial and isinstance(transport, asyncio.WriteTransport):
            transport.write(_timeout_answer(self._deadlines.timeout, self._deadlines.answer_headers))
        transport.close()  # after the 408 is flushed


def _timeout_answer(timeout: float, headers: Mapping[str, str]) -> bytes:
    body = orjson.dumps(
        {"success": False, "code": "request_timeout", "message": f"request headers not received within {timeout:g}s"}
    )
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
