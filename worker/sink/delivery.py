"""The delivery engine: items in, each one delivered, dead-lettered or dropped out. No Kafka in here.

It runs an asyncio loop on its own thread (aiohttp) and, per destination endpoint:
- groups ready items into requests within the endpoint's item and byte limits, waiting at most
  `linger_ms` for a request to fill;
- sends at most `concurrency` requests at once, under the destination's events-per-second bucket;
- acts on each item's verdict (worker.destinations.base.Verdict): delivered; resent at once
  (a batch-mate was bad); retried with exponential backoff and full jitter, honouring
  Retry-After, until the retry budget is spent (then `exhausted`); held back per user while that
  user is throttled, without holding anyone else; bisected when a request is too large or is
  rejected without saying which item (so one poison item never fails its batch-mates); or
  dead-lettered as `permanent`.

Every submitted item is reported exactly once, through `report(ItemReport)` on the engine's
thread (worker.sink.reports: Delivered, Failed, or Withdrawn after `withdraw()`); a change of the
circuit state is reported through the same callable as a `CircuitReport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from worker import logs, metrics
from worker.destinations.base import Destination, Endpoint, Item, ItemResult, Outcome, Verdict
from worker.dlq.headers import Kind
from worker.sink.ratelimit import TokenBucket
from worker.sink.reports import DELIVERED, CircuitReport, Failed, ItemReport, Report, Withdrawn
from worker.sink.settings import SinkSettings

log = logs.get(__name__)

REVOKED = Withdrawn("partition revoked")
MAX_RESEND_DEPTH = 4  # a destination that keeps blaming batch-mates gets retried normally after this


@dataclass(slots=True, eq=False)
class Pending:
    """An item on its way, with its retry state and the opaque owner the caller gets back."""

    item: Item
    owner: Any
    size: int  # bytes of its JSON payload, for the request byte limit
    attempts: int = 0  # every failed try (the dead letter's `attempts` header)
    charged: int = 0  # tries that count against max_attempts: those made while the destination was up
    first_failure: float | None = None
    ready_at: float = 0.0
    reason: str = ""
    http_status: int | None = None


ReportSink = Callable[[Report], None]


class DeliveryEngine:
    def __init__(self, destination: Destination, settings: SinkSettings, report: ReportSink) -> None:
        self.destination = destination
        self.settings = settings
        self.report = report
        self.name = destination.name
        self._secrets = logs.secret_values(getattr(destination, "config", None))
        self._circuit_was_open = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"delivery-{self.name}", daemon=True)
        self._ready: dict[str, deque[Pending]] = {name: deque() for name in destination.endpoints}
        self._delayed: list[tuple[float, int, Pending]] = []
        self._held: dict[str, tuple[float, list[Pending]]] = {}  # throttled user -> (until, their items)
        self._sequence = itertools.count()
        self._active = 0
        # Requests in a row that got no 2xx at all: the destination's "circuit" is open past a threshold.
        self.consecutive_failures = 0
        self._bucket = TokenBucket(destination.events_per_second) if destination.events_per_second else None
        self._wake: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._delivered = metrics.DELIVERED.labels(self.name)
        self._retried = metrics.RETRIED.labels(self.name)
        self._latency = metrics.REQUEST_SECONDS.labels(self.name)

    # -- the caller's side (any thread) ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def submit(self, items: Sequence[Pending]) -> None:
        if items:
            self._loop.call_soon_threadsafe(self._enqueue, list(items))

    def withdraw(self, owned: Callable[[Any], bool]) -> None:
        """Withdraw every queued item whose owner matches; requests already sent still report."""
        self._loop.call_soon_threadsafe(self._withdraw, owned)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    # -- the engine's thread --------------------------------------------------------------------

    async def _start(self) -> None:
        self._wake = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout)
        connector = aiohttp.TCPConnector(limit=self.settings.concurrency * 2)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def _close(self) -> None:
        for task in [self._dispatcher, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._dispatcher, *self._tasks] if t is not None), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _enqueue(self, items: list[Pending]) -> None:
        now = time.monotonic()
        for pending in items:
            pending.ready_at = now
            self._route(pending)
        self._poke()

    def _route(self, pending: Pending) -> None:
        held = self._held.get(pending.item.user) if pending.item.user else None
        if held is not None:
            held[1].append(pending)  # keep a throttled user's items together, in order
        else:
            self._ready[pending.item.endpoint].append(pending)

    def _withdraw(self, owned: Callable[[Any], bool]) -> None:
        for name, queue in self._ready.items():
            kept = deque()
            for pending in queue:
                if owned(pending.owner):
                    self.report(ItemReport(pending.owner, REVOKED))
                else:
                    kept.append(pending)
            self._ready[name] = kept
        delayed = []
        for entry in self._delayed:
            if owned(entry[2].owner):
                self.report(ItemReport(entry[2].owner, REVOKED))
            else:
                delayed.append(entry)
        heapq.heapify(delayed)
        self._delayed = delayed
        for user, (until, items) in list(self._held.items()):
            kept_items = [p for p in items if not owned(p.owner)]
            for pending in items:
                if owned(pending.owner):
                    self.report(ItemReport(pending.owner, REVOKED))
            self._held[user] = (until, kept_items)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _dispatch(self) -> None:
        assert self._wake is not None
        linger = self.settings.linger_ms / 1000
        while True:
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                pending = heapq.heappop(self._delayed)[2]
                pending.ready_at = now
                self._route(pending)
            for user, (until, items) in list(self._held.items()):
                if until <= now:
                    del self._held[user]
                    for pending in items:
                        pending.ready_at = now
                        self._route(pending)
            next_wake = now + 1.0
            for name, queue in self._ready.items():
                endpoint = self.destination.endpoints[name]
                while queue and self._active < self.settings.concurrency:
                    if len(queue) < endpoint.max_items and now - queue[0].ready_at < linger:
                        next_wake = min(next_wake, queue[0].ready_at + linger)
                        break
                    self._launch(endpoint, _take_group(queue, endpoint))
            if self._delayed:
                next_wake = min(next_wake, self._delayed[0][0])
            for until, _items in self._held.values():
                next_wake = min(next_wake, until)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_wake - time.monotonic()))

    def _launch(self, endpoint: Endpoint, group: list[Pending]) -> None:
        self._active += 1
        task = asyncio.create_task(self._send_group(endpoint, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_group(self, endpoint: Endpoint, group: list[Pending]) -> None:
        try:
            if self._bucket is not None:
                await self._bucket.take(len(group))
            await self._attempt(endpoint, group, resend_depth=0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose items: treat it as a transient failure
            log.exception("delivery attempt failed unexpectedly", destination=self.name)
            for pending in group:
                self._retry(pending, ItemResult(Verdict.RETRY, f"internal error: {exc}"), None)
        finally:
            self._active -= 1
            self._poke()

    async def _attempt(self, endpoint: Endpoint, group: list[Pending], resend_depth: int) -> None:
        outcome = await self._send(endpoint, group)
        status = outcome.http_status
        self.consecutive_failures = 0 if status is not None and status < 500 else self.consecutive_failures + 1
        self._report_circuit()
        if not outcome.per_item and len(group) > 1 and _bisect_worthy(outcome):
            half = len(group) // 2  # rejected as a whole without naming an item: find the poison one
            await self._attempt(endpoint, group[:half], resend_depth)
            await self._attempt(endpoint, group[half:], resend_depth)
            return
        resend: list[Pending] = []
        for index, pending in enumerate(group):
            result = outcome.for_item(index)
            verdict = result.verdict
            if verdict is Verdict.OK:
                self._delivered.inc()
                self.report(ItemReport(pending.owner, DELIVERED))
            elif verdict is Verdict.RESEND and resend_depth < MAX_RESEND_DEPTH:
                resend.append(pending)
            elif verdict is Verdict.THROTTLED:
                self._throttle(pending, result, outcome.http_status)
            elif verdict in (Verdict.PERMANENT, Verdict.SPLIT):  # SPLIT of a single item: too large to ever fit
                self._dead(pending, Kind.PERMANENT, result.reason or "rejected", outcome.http_status)
            else:  # RETRY, or RESEND too many times
                self._retry(pending, result, outcome.http_status)
        if resend:
            await self._attempt(endpoint, resend, resend_depth + 1)

    async def _send(self, endpoint: Endpoint, group: list[Pending]) -> Outcome:
        assert self._session is not None
        request = self.destination.encode(endpoint, [p.item for p in group])
        url = self.destination.base_urls[request.base].rstrip("/") + request.path
        started = time.monotonic()
        try:
            async with self._session.request(
                request.method, url, data=request.body, headers=dict(request.headers)
            ) as response:
                body = await response.read()
                status, headers = response.status, dict(response.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            metrics.HTTP_RESPONSES.labels(self.name, "error").inc()
            return Outcome(None, ItemResult(Verdict.RETRY, f"{type(exc).__name__}: {exc}".strip(": ")))
        finally:
            self._latency.observe(time.monotonic() - started)
        metrics.HTTP_RESPONSES.labels(self.name, str(status)).inc()
        return self.destination.classify(endpoint, [p.item for p in group], status, body, headers)

    def _retry(self, pending: Pending, result: ItemResult, http_status: int | None) -> None:
        now = time.monotonic()
        pending.attempts += 1
        if not self.circuit_open:
            pending.charged += 1
        pending.reason = logs.scrub(result.reason, self._secrets)
        pending.http_status = http_status
        if pending.first_failure is None:
            pending.first_failure = now
        s = self.settings
        if pending.charged >= s.max_attempts or now - pending.first_failure >= s.max_retry_seconds:
            reason = f"gave up after {pending.attempts} attempts: {pending.reason}"
            self._dead(pending, Kind.EXHAUSTED, reason, http_status)
            return
        self._retried.inc()
        backoff = random.uniform(0, min(s.backoff_max, s.backoff_initial * 2 ** (pending.attempts - 1)))
        delay = max(backoff, result.retry_after or 0.0)
        heapq.heappush(self._delayed, (now + delay, next(self._sequence), pending))

    def _report_circuit(self) -> None:
        if self.circuit_open != self._circuit_was_open:
            self._circuit_was_open = self.circuit_open
            self.report(CircuitReport(self.circuit_open, self.consecutive_failures))

    @property
    def circuit_open(self) -> bool:
        """The destination is down for everyone, not failing for this item."""
        return self.consecutive_failures >= self.settings.circuit_open_after

    def _throttle(self, pending: Pending, result: ItemResult, http_status: int | None) -> None:
        """Hold back only this item's user; everyone else keeps flowing."""
        pending.attempts += 1
        pending.reason = result.reason
        pending.http_status = http_status
        if pending.attempts >= self.settings.max_attempts:
            self._dead(pending, Kind.EXHAUSTED, f"throttled {pending.attempts} times: {result.reason}", http_status)
            return
        self._retried.inc()
        until = time.monotonic() + (result.retry_after or self.settings.throttle_default)
        user = pending.item.user
        held = self._held.get(user)
        if held is None:
            self._held[user] = (until, [pending])
        else:
            self._held[user] = (max(until, held[0]), [*held[1], pending])

    def _dead(self, pending: Pending, kind: Kind, reason: str, http_status: int | None) -> None:
        reason = logs.scrub(reason, self._secrets)
        pending.reason = reason
        pending.http_status = http_status
        self.report(ItemReport(pending.owner, Failed(kind, reason, pending.attempts, http_status)))


def _bisect_worthy(outcome: Outcome) -> bool:
    """A request rejected as a whole, where a smaller request could succeed: too large, or a 4xx
    about the content that names no item (auth and not-found errors are not about the content)."""
    verdict = outcome.default.verdict
    if verdict is Verdict.SPLIT:
        return True
    return verdict is Verdict.PERMANENT and outcome.http_status in (400, 422)


def _take_group(queue: deque[Pending], endpoint: Endpoint) -> list[Pending]:
    group: list[Pending] = []
    size = 0
    while queue and len(group) < endpoint.max_items:
        pending = queue[0]
        if group and size + pending.size + 1 > endpoint.max_bytes:
            break
        group.append(queue.popleft())
        size += pending.size + 1
    return group
