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

Per-user order (`per_user_order`, on by default): each user's unsettled items form a lane. A lane
releases one run at a time (its head and the next items for the same endpoint, as many as one
request takes) and nothing more until that run's request has ended; items that come back from it
(to retry, or throttled) return to the front of the lane, which then waits until they are due. So
a user is never in two requests at once, a later item never overtakes an earlier one being
retried, and other users' lanes are not held up. Items of nobody (no `user`) go alone, unordered.

Revoke (`withdraw`): queued items of the revoked owners are reported `Withdrawn` at once; those in a
request under way are marked so that whatever the answer they are never tried again, and
`withdraw` waits for those requests (at most the request timeout) before it returns.

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
`_settle` (or `_settle_delivered`, for the items one request delivered), which marks the item
settled; an item is reported only if it is not, and an unexpected error while a request is handled
retries only the items of that request that are neither settled nor already queued again. Reports
go through `report` on the engine's thread (worker.sink.reports: one `DeliveredReport` a request
for the items it delivered, an `ItemReport` for each Failed, or Withdrawn after `withdraw()`); a
change of the circuit
state is reported through the same callable as a `CircuitReport`, and a change in how many items
are held for throttled users as a `HoldReport`.

Items waiting in a held lane (a retry's backoff or a throttle) are counted apart
(`HoldReport.held`), so the caller can leave them out of the shared buffer that pauses every
partition: one slow heavy user does not stall the others. The credit is bounded: at most
`max_held_per_user` items of one user and `max_held_events` in all count as held; beyond that they
count towards the shared buffer again, so the caller's memory stays bounded by its buffer plus
`max_held_events`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from worker import logs, metrics
from worker.destinations.base import Destination, Endpoint, Item, ItemResult, Outcome, Request, Verdict
from worker.dlq.headers import Kind
from worker.sink.ratelimit import TokenBucket
from worker.sink.reports import (
    CircuitReport,
    DeliveredReport,
    Failed,
    HoldReport,
    ItemOutcome,
    ItemReport,
    Report,
    Withdrawn,
)
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
    revoked: bool = False  # its partition was revoked while it was in a request: it is never tried again
    order: int = 0  # when it was submitted: one user's items go out in this order


ReportSink = Callable[[Report], None]


class _Lane:
    """One user's unsettled items: sent in submission order, in at most one request at a time.

    `waiting` holds the items not yet released to a request; `busy` says one of its runs is queued
    for a request or in one; `until` is when its head may go again (a retry's backoff, or a throttle
    hold); `returned` gathers, during the request under way, the items that came back from it (to be
    retried, or not sent because an earlier one of the same user came back), to go back in front of
    `waiting` when that request ends. `credit` is how many of its items count as held (see `_recredit`).
    """

    __slots__ = ("busy", "credit", "queued", "queued_size", "returned", "until", "waiting")

    def __init__(self) -> None:
        self.waiting: deque[Pending] = deque()
        self.returned: list[Pending] = []
        self.busy = False
        self.until = 0.0
        self.credit = 0
        # Its run while it waits in a ready queue (not yet in a request): later items join it there,
        # so a busy sink sends fuller runs of fewer users per request, and more requests at once.
        self.queued: list[Pending] | None = None
        self.queued_size = 0


class DeliveryEngine:
    def __init__(self, destination: Destination, settings: SinkSettings, report: ReportSink) -> None:
        self.destination = destination
        self.settings = settings
        self.report = report
        self.name = destination.name
        self._per_user_order = settings.per_user_order  # read several times an item: a plain attribute
        self._secrets = logs.secret_values(getattr(destination, "config", None))
        self._circuit_was_open = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"delivery-{self.name}", daemon=True)
        # Per endpoint, the runs ready for a request: one user's consecutive items, or one item of nobody.
        self._ready: dict[str, deque[list[Pending]]] = {name: deque() for name in destination.endpoints}
        self._ready_items: dict[str, int] = dict.fromkeys(destination.endpoints, 0)
        self._delayed: list[tuple[float, int, Pending]] = []  # retries of items of nobody, by due time
        self._lanes: dict[str, _Lane] = {}  # user -> their unsettled items
        self._wakes: list[tuple[float, int, str]] = []  # (when, _, user): a lane's `until` passes
        self._in_flight: set[Pending] = set()
        self._held_credit = 0  # sum of the lanes' credits
        self._held_reported = 0
        self._sequence = itertools.count()
        self._order = itertools.count()
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

    def withdraw(self, owned: Callable[[Any], bool], wait: float | None = None) -> int:
        """Withdraw every item whose owner matches (its partition was revoked): queued ones at once;
        those in a request under way are never tried again, and this waits up to `wait` seconds
        (default: the request timeout, which bounds any request) for those requests to end.
        Returns how many of them were still under way when it stopped waiting."""
        if not self._thread.is_alive():
            return 0
        wait = self.settings.request_timeout if wait is None else wait
        future = asyncio.run_coroutine_threadsafe(self._withdraw(owned, wait), self._loop)
        try:
            return future.result(wait + 5.0)
        except TimeoutError:
            return -1

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

    def _user(self, pending: Pending) -> str:
        """The lane an item goes in; "" (none: it goes alone) for items of nobody, or with
        SINK_PER_USER_ORDER off."""
        return pending.item.user if self._per_user_order else ""

    def _enqueue(self, items: list[Pending]) -> None:
        now = time.monotonic()
        touched: dict[str, _Lane] = {}  # released after all are in: a run takes what came together
        for pending in items:
            try:
                if pending.item.endpoint not in self._ready:
                    raise ValueError(f"{self.name} has no endpoint {pending.item.endpoint!r}")
                pending.ready_at = now
                pending.order = next(self._order)
                user = self._user(pending)
                if not user:
                    self._queue_alone(pending)
                    continue
                lane = self._lanes.get(user)
                if lane is None:
                    lane = self._lanes[user] = _Lane()
                if not lane.waiting and self._joins_queued_run(lane, pending):
                    continue
                lane.waiting.append(pending)
                touched[user] = lane
            except Exception as exc:  # a malformed item fails alone; the others are queued
                self._dead(pending, Kind.INVALID, f"{type(exc).__name__}: {exc}", None)
        for user, lane in touched.items():
            self._recredit(lane, now)
            self._release(user, lane, now)
        self._report_held()
        self._poke()

    def _joins_queued_run(self, lane: _Lane, pending: Pending) -> bool:
        """Add `pending` to the end of its lane's run still waiting in a ready queue, if it fits."""
        run = lane.queued
        if run is None or run[0].item.endpoint != pending.item.endpoint:
            return False
        endpoint = self.destination.endpoints[pending.item.endpoint]
        if len(run) >= endpoint.max_items or lane.queued_size + pending.size + 1 > endpoint.max_bytes:
            return False
        run.append(pending)
        lane.queued_size += pending.size + 1
        self._ready_items[pending.item.endpoint] += 1
        return True

    def _queue_alone(self, pending: Pending) -> None:
        name = pending.item.endpoint
        self._ready[name].append([pending])
        self._ready_items[name] += 1

    def _release(self, user: str, lane: _Lane, now: float) -> None:
        """Queue the lane's next run for a request, if it may go: nothing of it is queued or in a
        request, and its hold has passed. The run is the head and the items after it for the same
        endpoint, as many as one request takes, so a user is never in two requests at once."""
        if lane.busy or lane.until > now:
            return
        if not lane.waiting:
            del self._lanes[user]
            return
        name = lane.waiting[0].item.endpoint
        endpoint = self.destination.endpoints[name]
        run: list[Pending] = []
        size = 0
        while lane.waiting and len(run) < endpoint.max_items:
            pending = lane.waiting[0]
            if pending.item.endpoint != name or (run and size + pending.size + 1 > endpoint.max_bytes):
                break
            run.append(lane.waiting.popleft())
            size += pending.size + 1
        lane.busy = True
        lane.queued, lane.queued_size = run, size
        self._recredit(lane, now)
        self._ready[name].append(run)
        self._ready_items[name] += len(run)

    def _recredit(self, lane: _Lane, now: float) -> None:
        """Items waiting in a lane that is held (a retry's backoff, a throttle) count apart from the
        shared buffer, at most max_held_per_user of one user."""
        credit = min(len(lane.waiting), self.settings.max_held_per_user) if lane.until > now else 0
        self._held_credit += credit - lane.credit
        lane.credit = credit

    def _report_held(self) -> None:
        held = min(self._held_credit, self.settings.max_held_events)
        if held != self._held_reported:
            self._held_reported = held
            self.report(HoldReport(held))

    async def _withdraw(self, owned: Callable[[Any], bool], wait: float) -> int:
        now = time.monotonic()
        withdrawn: list[Pending] = []
        freed: list[str] = []  # lanes whose queued run was withdrawn whole: free to release again
        for name, queue in self._ready.items():
            kept_runs: deque[list[Pending]] = deque()
            for run in queue:
                kept = _keep_unowned(run, owned, withdrawn)
                user = self._user(run[0])
                lane = self._lanes.get(user) if user else None
                if kept:
                    kept_runs.append(kept)
                    if lane is not None and lane.queued is run:
                        lane.queued, lane.queued_size = kept, sum(pending.size + 1 for pending in kept)
                elif lane is not None:
                    lane.queued = None
                    freed.append(user)
            self._ready[name] = kept_runs
            self._ready_items[name] = sum(len(run) for run in kept_runs)
        for lane in self._lanes.values():
            lane.waiting = deque(_keep_unowned(lane.waiting, owned, withdrawn))
            lane.returned = _keep_unowned(lane.returned, owned, withdrawn)
            self._recredit(lane, now)
        for user in freed:
            if (lane := self._lanes.get(user)) is not None:
                lane.busy = False
        for user, lane in list(self._lanes.items()):
            self._release(user, lane, now)
        delayed = []
        for entry in self._delayed:
            if owned(entry[2].owner):
                withdrawn.append(entry[2])
            else:
                delayed.append(entry)
        heapq.heapify(delayed)
        self._delayed = delayed
        # The smaller hold count is reported before the withdrawn items: the caller's buffer never
        # looks emptier than it is.
        self._report_held()
        for pending in withdrawn:
            self._settle(pending, REVOKED)
        under_way = [pending for pending in self._in_flight if owned(pending.owner)]
        for pending in under_way:
            pending.revoked = True
        self._poke()
        deadline = time.monotonic() + wait
        while any(not pending.settled and pending.sending for pending in under_way):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        return sum(1 for pending in under_way if not pending.settled and pending.sending)

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
            self._queue_alone(pending)
        while self._wakes and self._wakes[0][0] <= now:
            user = heapq.heappop(self._wakes)[2]
            lane = self._lanes.get(user)
            if lane is not None and lane.until <= now:  # else gone, or held longer since (a later wake)
                self._recredit(lane, now)
                self._release(user, lane, now)
        self._report_held()
        next_wake = now + 1.0
        for name, queue in self._ready.items():
            endpoint = self.destination.endpoints[name]
            while queue and self._active < self.settings.concurrency:
                if self._ready_items[name] < endpoint.max_items and now - queue[0][0].ready_at < linger:
                    next_wake = min(next_wake, queue[0][0].ready_at + linger)
                    break
                self._launch(endpoint, self._take_group(name, endpoint))
        if self._delayed:
            next_wake = min(next_wake, self._delayed[0][0])
        if self._wakes:
            next_wake = min(next_wake, self._wakes[0][0])
        return next_wake

    def _take_group(self, name: str, endpoint: Endpoint) -> list[Pending]:
        """Whole runs from the front of the endpoint's queue, within its item and byte limits (the
        first run always fits: `_release` made it so)."""
        queue = self._ready[name]
        group: list[Pending] = []
        size = 0
        while queue:
            run = queue[0]
            user = self._user(run[0])
            lane = self._lanes[user] if user else None
            # A lane keeps its queued run's size as items join it; an item of nobody goes alone.
            run_size = lane.queued_size if lane is not None else run[0].size + 1
            if group and (len(group) + len(run) > endpoint.max_items or size + run_size > endpoint.max_bytes):
                break
            group.extend(queue.popleft())
            size += run_size
            if lane is not None:
                lane.queued = None  # in a request now: nothing joins it any more
        self._ready_items[name] -= len(group)
        return group

    def _launch(self, endpoint: Endpoint, group: list[Pending]) -> None:
        for pending in group:
            pending.sending = True
            self._in_flight.add(pending)
        self._active += 1
        task = asyncio.create_task(self._send_group(endpoint, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop_sending(self, pending: Pending) -> None:
        pending.sending = False
        self._in_flight.discard(pending)

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
            self._end_request(group)
            self._report_held()
            self._poke()

    def _end_request(self, group: list[Pending]) -> None:
        """The request is over: what came back from it goes in front of its lane, in submission
        order, and each of its users may have their next run released."""
        now = time.monotonic()
        for user in {self._user(pending) for pending in group}:
            lane = self._lanes.get(user) if user else None
            if lane is None:
                continue
            if lane.returned:
                lane.waiting.extendleft(sorted(lane.returned, key=_submission_order, reverse=True))
                lane.returned = []
            lane.busy = False
            self._recredit(lane, now)
            self._release(user, lane, now)

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

    def _sendable(self, group: list[Pending]) -> list[Pending]:
        """The items of `group` to try now: not those settled, nor those revoked (withdrawn), nor a
        user's items after one of theirs came back from this request (they wait behind it)."""
        sendable = []
        for pending in group:
            if pending.settled:
                continue
            if pending.revoked:
                self._settle(pending, REVOKED)
                continue
            user = self._user(pending)
            lane = self._lanes.get(user) if user else None
            if lane is not None and lane.returned:
                self._stop_sending(pending)
                lane.returned.append(pending)
                continue
            sendable.append(pending)
        return sendable

    async def _attempt(self, endpoint: Endpoint, group: list[Pending], resend_depth: int) -> None:
        group = self._sendable(group)
        if not group:
            return
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
        delivered: list[Pending] = []
        try:
            for index, pending in enumerate(group):
                if pending.settled:
                    continue
                result = outcome.for_item(index)
                verdict = result.verdict
                if verdict is Verdict.OK:
                    delivered.append(pending)
                elif pending.revoked:  # not ours any more: its partition's new owner redoes it
                    self._settle(pending, REVOKED)
                elif verdict is Verdict.RESEND and resend_depth < MAX_RESEND_DEPTH:
                    resend.append(pending)
                elif verdict is Verdict.THROTTLED:
                    self._throttle(pending, result, outcome.http_status)
                elif verdict in (Verdict.PERMANENT, Verdict.SPLIT):  # SPLIT of a single item: too large to ever fit
                    self._dead(pending, Kind.PERMANENT, result.reason or "rejected", outcome.http_status)
                else:  # RETRY, or RESEND too many times
                    self._retry(pending, result, outcome.http_status)
        finally:  # what the destination took is settled even if a batch-mate's handling fails
            if delivered:
                self._settle_delivered(delivered)
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
        self._wait(pending, now + delay)

    def _wait(self, pending: Pending, due: float) -> None:
        """Try `pending` again at `due`: alone if it has no lane, else back in its lane, which (with
        every later item of its user) waits until then."""
        self._stop_sending(pending)
        user = self._user(pending)
        lane = self._lanes.get(user) if user else None
        if lane is None:
            heapq.heappush(self._delayed, (due, next(self._sequence), pending))
            return
        lane.returned.append(pending)
        if due > lane.until:
            lane.until = due
            heapq.heappush(self._wakes, (due, next(self._sequence), user))

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
        self._wait(pending, now + min(hint if hint is not None else s.throttle_default, remaining))

    def _dead(self, pending: Pending, kind: Kind, reason: str, http_status: int | None) -> None:
        reason = logs.scrub(reason, self._secrets)
        pending.reason = reason
        pending.http_status = http_status
        self._settle(pending, Failed(kind, reason, pending.attempts, http_status))

    def _settle(self, pending: Pending, outcome: ItemOutcome) -> None:
        """The one place an item that was not delivered is reported: once, whatever happens after."""
        if self._mark_settled(pending):
            self.report(ItemReport(pending.owner, outcome))

    def _settle_delivered(self, group: list[Pending]) -> None:
        """The one place delivered items are reported: a request's in one report, each once. Most
        items end here, so it is one report (and one counter increment, which takes a lock) a
        request, not one an item."""
        owners = [pending.owner for pending in group if self._mark_settled(pending)]
        if owners:
            self._delivered.inc(len(owners))
            self.report(DeliveredReport(owners))

    def _mark_settled(self, pending: Pending) -> bool:
        if pending.settled:
            log.error("an item was settled twice; the second outcome is dropped", destination=self.name)
            return False
        pending.settled = True
        self._stop_sending(pending)
        return True


def _keep_unowned(items: Iterable[Pending], owned: Callable[[Any], bool], withdrawn: list[Pending]) -> list[Pending]:
    """The items whose owner is not `owned`, in order; the others are appended to `withdrawn`."""
    kept = []
    for pending in items:
        (withdrawn if owned(pending.owner) else kept).append(pending)
    return kept


def _submission_order(pending: Pending) -> int:
    return pending.order


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
