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
  dead-lettered as `permanent`. An item the destination cannot `encode` is dead-lettered
  `invalid` alone: its batch-mates are encoded and sent without it.

The circuit: a response that refuses every item of its request as transient (5xx, timeouts and
connection errors, and also 401/403/429 or any other answer whose every item is RETRY, i.e. no
per-user detail) is a failure of the destination for everyone; `circuit_open_after` of those in a
row open the circuit, any other answer closes it. While it is open, failures are not charged to
the items (only `max_retry_seconds` runs), so an outage, a 429 storm or a rejected key pauses the
sink instead of dead-lettering everything.

Waits are bounded: a Retry-After (or an API's own hint) is honoured up to `backoff_max` and never
beyond the item's remaining `max_retry_seconds`; nan or negative hints are ignored, and the
exponential backoff's exponent is capped so it cannot overflow however many attempts an outage
takes.

Every submitted item is reported exactly once, by construction: each report goes through
`_settle`, which marks the item settled; an item is reported only if it is not, and an unexpected
error while a request is handled retries only the items of that request that are neither settled
nor already queued again. Reports go through `report(ItemReport)` on the engine's thread
(worker.sink.reports: Delivered, Failed, or Withdrawn after `withdraw()`); a change of the circuit
state is reported through the same callable as a `CircuitReport`, and a change in how many items
are held for throttled users as a `HoldReport`.

Items held for a throttled user are counted apart (`HoldReport.held`), so the caller can leave them
out of the shared buffer that pauses every partition: one heavy throttled user does not stall the
others. The credit is bounded: at most `max_held_per_user` items of one user and `max_held_events`
in all count as held; beyond that they count towards the shared buffer again, so the caller's
memory stays bounded by its buffer plus `max_held_events`.
"""

from __future__ import annotations

import asyncio
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
from worker.destinations.base import Destination, Endpoint, Item, ItemResult, Outcome, Request, Verdict
from worker.dlq.headers import Kind
from worker.sink.ratelimit import TokenBucket
from worker.sink.reports import DELIVERED, CircuitReport, Failed, ItemOutcome, ItemReport, Report, Withdrawn
from worker.sink.settings import SinkSettings

log = logs.get(__name__)

REVOKED = Withdrawn("partition revoked")
MAX_RESEND_DEPTH = 4  # a destination that keeps blaming batch-mates gets retried normally after this
# 2 ** 62 times any backoff_initial is far beyond any backoff_max, and still a finite float: an item
# retried through a long outage (thousands of uncharged attempts) never overflows its backoff.
MAX_BACKOFF_EXPONENT = 62


@dataclass(slots=True, eq=False)
class Pending:
    """An item on its way, with its retry state and the opaque owner the caller gets back."""

    item: Item
    owner: Any
    size: int  # bytes of its JSON payload, for the request byte limit
    attempts: int = 0  # every failed try (the dead letter's `attempts` header)
    charged: int = 0  # tries that count against max_attempts: those made while the destination was up
    throttled: int = 0  # times its user was throttled (per-user 429s), also against max_attempts
    first_failure: float | None = None
    ready_at: float = 0.0
    reason: str = ""
    http_status: int | None = None
    settled: bool = False  # reported: it is never reported, retried or queued again
    sending: bool = False  # in a request under way (not queued anywhere): what an internal error retries


@dataclass(frozen=True, slots=True)
class HoldReport:
    """How many items held for throttled users count apart from the shared buffer (see the module
    docstring): the caller's backpressure leaves these out. Sent whenever the number changes."""

    held: int


EngineReport = Report | HoldReport
ReportSink = Callable[[EngineReport], None]


class _Hold:
    """A throttled user's items, in order, and when the user may be sent to again."""

    __slots__ = ("items", "until")

    def __init__(self, until: float) -> None:
        self.until = until
        self.items: deque[Pending] = deque()


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
        self._held: dict[str, _Hold] = {}  # throttled user -> their items
        self._held_credit = 0  # sum over held users of min(their items, max_held_per_user)
        self._held_reported = 0
        self._sequence = itertools.count()
        self._active = 0
        # Requests in a row that were refused for everyone: the destination's "circuit" is open past a threshold.
        self.consecutive_failures = 0
        self._bucket = TokenBucket(destination.events_per_second) if destination.events_per_second else None
        self._waiter: asyncio.Future[None] | None = None  # the dispatcher's sleep, cut short by _poke
        self._wake = asyncio.Event()  # set by _poke, cleared as the dispatcher takes the wake-up (never awaited)
        self._closing = False
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
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout)
        connector = aiohttp.TCPConnector(limit=self.settings.concurrency * 2)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def _close(self) -> None:
        self._closing = True
        for task in [self._dispatcher, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._dispatcher, *self._tasks] if t is not None), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _enqueue(self, items: list[Pending]) -> None:
        now = time.monotonic()
        for pending in items:
            try:
                if pending.item.endpoint not in self._ready:
                    raise ValueError(f"{self.name} has no endpoint {pending.item.endpoint!r}")
                pending.ready_at = now
                self._route(pending)
            except Exception as exc:  # a malformed item fails alone; the others are queued
                self._dead(pending, Kind.INVALID, f"{type(exc).__name__}: {exc}", None)
        self._report_held()
        self._poke()

    def _route(self, pending: Pending) -> None:
        user = pending.item.user
        hold = self._held.get(user) if user else None
        if hold is not None:
            self._hold(hold, pending)  # keep a throttled user's items together, in order
        else:
            self._ready[pending.item.endpoint].append(pending)

    def _hold(self, hold: _Hold, pending: Pending) -> None:
        if len(hold.items) < self.settings.max_held_per_user:
            self._held_credit += 1
        hold.items.append(pending)

    def _unhold(self, user: str) -> _Hold:
        hold = self._held.pop(user)
        self._held_credit -= min(len(hold.items), self.settings.max_held_per_user)
        return hold

    def _report_held(self) -> None:
        held = min(self._held_credit, self.settings.max_held_events)
        if held != self._held_reported:
            self._held_reported = held
            self.report(HoldReport(held))

    def _withdraw(self, owned: Callable[[Any], bool]) -> None:
        # Held items first, and the smaller hold count reported before their reports: the caller's
        # buffer never looks emptier than it is.
        withdrawn_held: list[Pending] = []
        for user in list(self._held):
            hold = self._unhold(user)
            kept_hold = self._held[user] = _Hold(hold.until)
            for pending in hold.items:
                if owned(pending.owner):
                    withdrawn_held.append(pending)
                else:
                    self._hold(kept_hold, pending)
        self._report_held()
        for pending in withdrawn_held:
            self._settle(pending, REVOKED)
        for name, queue in self._ready.items():
            kept: deque[Pending] = deque()
            for pending in queue:
                if owned(pending.owner):
                    self._settle(pending, REVOKED)
                else:
                    kept.append(pending)
            self._ready[name] = kept
        delayed = []
        for entry in self._delayed:
            if owned(entry[2].owner):
                self._settle(entry[2], REVOKED)
            else:
                delayed.append(entry)
        heapq.heapify(delayed)
        self._delayed = delayed

    def _poke(self) -> None:
        self._wake.set()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _dispatch(self) -> None:
        while not self._closing:
            try:
                next_wake = self._dispatch_due()
            except Exception:  # the dispatcher must outlive any bug, or every queued item would hang
                log.exception("delivery dispatch failed unexpectedly", destination=self.name)
                next_wake = time.monotonic() + 0.1
            self._wake.clear()
            await self._sleep(max(0.0, next_wake - time.monotonic()))

    async def _sleep(self, seconds: float) -> None:
        """Until `seconds` pass or `_poke` is called. (A plain future, not asyncio.wait_for on an
        Event: on Python 3.11 wait_for can swallow a cancel that meets a wake-up, and then stop()
        would wait for a dispatcher that never ends.)"""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(seconds, _wake_up, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _dispatch_due(self) -> float:
        """Move due items back to the queues, launch the requests that are ready; when to look again."""
        linger = self.settings.linger_ms / 1000
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            pending = heapq.heappop(self._delayed)[2]
            pending.ready_at = now
            self._route(pending)
        released = False
        for user, hold in list(self._held.items()):
            if hold.until <= now:
                released = True
                for pending in self._unhold(user).items:
                    pending.ready_at = now
                    self._route(pending)
        if released:
            self._report_held()
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
        for hold in self._held.values():
            next_wake = min(next_wake, hold.until)
        return next_wake

    def _launch(self, endpoint: Endpoint, group: list[Pending]) -> None:
        for pending in group:
            pending.sending = True
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
        except Exception as exc:  # a bug must not lose items, nor report any twice
            log.exception("delivery attempt failed unexpectedly", destination=self.name)
            self._recover(group, exc)
        finally:
            self._active -= 1
            self._report_held()
            self._poke()

    def _recover(self, group: list[Pending], exc: Exception) -> None:
        """After an unexpected error: retry the items of `group` that are neither settled nor queued
        again (each exactly once); one that cannot even be retried is dead-lettered."""
        result = ItemResult(Verdict.RETRY, f"internal error: {type(exc).__name__}: {exc}")
        for pending in group:
            if pending.settled or not pending.sending:
                continue
            try:
                self._retry(pending, result, None)
            except Exception as again:
                log.exception("could not retry an item", destination=self.name)
                self._dead(pending, Kind.EXHAUSTED, f"internal error: {type(again).__name__}: {again}", None)

    async def _attempt(self, endpoint: Endpoint, group: list[Pending], resend_depth: int) -> None:
        encoded = self._encode(endpoint, group)
        if encoded is None:  # some items could not be encoded: the rest go in requests of their own
            if len(group) > 1:
                for part in self._encodable_parts(endpoint, group):
                    await self._attempt(endpoint, part, resend_depth)
            return
        outcome = await self._send(endpoint, group, encoded)
        self._count_for_circuit(outcome, len(group))
        if not outcome.per_item and len(group) > 1 and _bisect_worthy(outcome):
            half = len(group) // 2  # rejected as a whole without naming an item: find the poison one
            await self._attempt(endpoint, group[:half], resend_depth)
            await self._attempt(endpoint, group[half:], resend_depth)
            return
        resend: list[Pending] = []
        for index, pending in enumerate(group):
            if pending.settled:
                continue
            result = outcome.for_item(index)
            verdict = result.verdict
            if verdict is Verdict.OK:
                self._delivered.inc()
                self._settle(pending, DELIVERED)
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

    def _encode(self, endpoint: Endpoint, group: list[Pending]) -> Request | None:
        """The request for `group`, or None when it cannot be encoded; a single item that cannot be
        is dead-lettered `invalid` (encoding is pure: it would fail the same way every time)."""
        try:
            return self.destination.encode(endpoint, [p.item for p in group])
        except Exception as exc:
            if len(group) == 1:
                self._dead(group[0], Kind.INVALID, f"{type(exc).__name__}: {exc}", None)
            return None

    def _encodable_parts(self, endpoint: Endpoint, group: list[Pending]) -> list[list[Pending]]:
        """Encode each item alone: those that fail are dead-lettered `invalid`; the others go on
        together (or one by one, should they only fail together)."""
        good = [pending for pending in group if self._encode(endpoint, [pending]) is not None]
        if not good:
            return []
        if len(good) < len(group):
            try:
                self.destination.encode(endpoint, [p.item for p in good])
            except Exception:
                return [[pending] for pending in good]
            return [good]
        return [[pending] for pending in good]

    async def _send(self, endpoint: Endpoint, group: list[Pending], request: Request) -> Outcome:
        assert self._session is not None
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

    def _count_for_circuit(self, outcome: Outcome, count: int) -> None:
        """A response that refused every item as transient (RETRY, no per-item detail that lets any
        through) is the destination refusing everyone; any other answer means it works."""
        refused = all(outcome.for_item(index).verdict is Verdict.RETRY for index in range(count))
        self.consecutive_failures = self.consecutive_failures + 1 if refused else 0
        self._report_circuit()

    def _hint(self, retry_after: float | None) -> float | None:
        """A Retry-After or API hint as a wait: at most backoff_max; None when absent, nan or negative."""
        if retry_after is None:
            return None
        try:
            seconds = float(retry_after)
        except (TypeError, ValueError, OverflowError):
            return None
        if not seconds >= 0.0:  # nan, or negative
            return None
        return min(seconds, self.settings.backoff_max)

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
        elapsed = now - pending.first_failure
        if pending.charged >= s.max_attempts or elapsed >= s.max_retry_seconds:
            reason = f"gave up after {pending.attempts} attempts: {pending.reason}"
            self._dead(pending, Kind.EXHAUSTED, reason, http_status)
            return
        self._retried.inc()
        exponent = min(pending.attempts - 1, MAX_BACKOFF_EXPONENT)
        delay = random.uniform(0, min(s.backoff_max, s.backoff_initial * 2.0**exponent))
        hint = self._hint(result.retry_after)
        if hint is not None:
            delay = max(delay, hint)
        delay = min(delay, s.max_retry_seconds - elapsed)  # its last try is due when its budget ends
        pending.sending = False
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
        now = time.monotonic()
        pending.attempts += 1
        pending.throttled += 1
        pending.reason = logs.scrub(result.reason, self._secrets)
        pending.http_status = http_status
        if pending.first_failure is None:
            pending.first_failure = now
        s = self.settings
        remaining = s.max_retry_seconds - (now - pending.first_failure)
        if pending.throttled >= s.max_attempts or remaining <= 0:
            self._dead(pending, Kind.EXHAUSTED, f"throttled {pending.throttled} times: {result.reason}", http_status)
            return
        self._retried.inc()
        hint = self._hint(result.retry_after)
        until = now + min(hint if hint is not None else s.throttle_default, remaining)
        pending.sending = False
        user = pending.item.user
        if not user:  # nobody to hold back: this item waits alone
            heapq.heappush(self._delayed, (until, next(self._sequence), pending))
            return
        hold = self._held.get(user)
        if hold is None:
            hold = self._held[user] = _Hold(until)
        else:
            hold.until = max(until, hold.until)
        self._hold(hold, pending)

    def _dead(self, pending: Pending, kind: Kind, reason: str, http_status: int | None) -> None:
        reason = logs.scrub(reason, self._secrets)
        pending.reason = reason
        pending.http_status = http_status
        self._settle(pending, Failed(kind, reason, pending.attempts, http_status))

    def _settle(self, pending: Pending, outcome: ItemOutcome) -> None:
        """The one place an item is reported: once, whatever happens after."""
        if pending.settled:
            log.error("an item was settled twice; the second outcome is dropped", destination=self.name)
            return
        pending.settled = True
        pending.sending = False
        self.report(ItemReport(pending.owner, outcome))


def _wake_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
