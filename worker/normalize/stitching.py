"""The wait line: anonymous events held a short, bounded time for the link that names their user.

An anonymous event and the identify that links its anonymousId to a userId are keyed differently,
so they can reach the normaliser in either order (another partition, another instance). Some
destinations cannot use an event without a userId (their registry entry's `needs_user_id`:
Amberflo, Brevo, Reteno; see worker/destinations/registry.py); for those, an event whose
anonymousId has no known link waits here until the link arrives or its wait runs out, and every
later event of that anonymousId queues behind it, so the person's order on those topics is kept.

Pure code, no Kafka and no clock of its own (the clock is injected): the strategy decides what to
hold and writes what comes out. Items are opaque to the line.

Invariant: the head of every anonymousId's queue is an entry with a wait of its own. An entry that
only keeps its place (`own_wait=False`) leaves with whatever is ahead of it, so it never waits at a
head; that makes the oldest waiting entry overall the head of its queue, and the deadlines in
`_timed` rise (one wait for every entry), so expiry and eviction are both a look at the left end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# The event types those destinations map; they skip group and alias whatever the ids.
USER_ID_TYPES = frozenset({"track", "page", "screen", "identify"})
# Events waiting at once, per normaliser process: ~2-3 KB each (the event and its encoding), so
# about 30 MB; 5000 anonymous events/s needing a userId at the default 2 s wait before eviction.
MAX_WAITING = 10_000

Release = tuple[str, list[T]]  # an anonymousId and its items, in order


class _Entry(Generic[T]):
    __slots__ = ("anonymous_id", "deadline", "item", "waiting")

    def __init__(self, anonymous_id: str, item: T, deadline: float) -> None:
        self.anonymous_id = anonymous_id
        self.item = item
        self.deadline = deadline  # -inf: no wait of its own, only its place in the queue
        self.waiting = True  # False once released or dropped (it may linger in `_timed` until then)


class WaitLine(Generic[T]):
    """Items held per anonymousId, in arrival order, each for at most `wait_ms`."""

    def __init__(
        self, wait_ms: int, max_waiting: int = MAX_WAITING, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if wait_ms <= 0 or max_waiting <= 0:
            raise ValueError("a wait line needs a positive wait and room for at least one item")
        self.wait = wait_ms / 1000
        self.max_waiting = max_waiting
        self.clock = clock
        # Public for the strategy's per-event membership test (one dict lookup, no call).
        self.by_id: dict[str, deque[_Entry[T]]] = {}
        self._timed: deque[_Entry[T]] = deque()  # entries with a wait of their own, oldest first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, anonymous_id: object) -> bool:
        return anonymous_id in self.by_id

    def hold(self, anonymous_id: str, item: T, *, own_wait: bool = True) -> list[Release[T]]:
        """Queue `item` behind whatever `anonymous_id` has waiting. With `own_wait` it waits for a
        userId itself; otherwise it only keeps its place, and with nothing ahead of it it is
        released at once. Returns what leaves now: the item itself in that case, or the oldest
        entries evicted to stay within `max_waiting` (released with whatever is known by then)."""
        queue = self.by_id.get(anonymous_id)
        if queue is None:
            if not own_wait:
                return [(anonymous_id, [item])]
            queue = self.by_id[anonymous_id] = deque()
        entry = _Entry(anonymous_id, item, self.clock() + self.wait if own_wait else float("-inf"))
        queue.append(entry)
        if own_wait:
            self._timed.append(entry)
        self._count += 1
        evicted: list[Release[T]] = []
        while self._count > self.max_waiting:
            oldest = self._oldest()
            evicted.append(self._release_head(oldest.anonymous_id, float("-inf"), force=True))
        return evicted

    def release(self, anonymous_id: str) -> list[T]:
        """The link arrived: every item of `anonymous_id`, in order."""
        queue = self.by_id.pop(anonymous_id, None)
        if queue is None:
            return []
        for entry in queue:
            entry.waiting = False
        self._count -= len(queue)
        return [entry.item for entry in queue]

    def due(self) -> list[Release[T]]:
        """Items whose wait ran out, with the ones queued only behind them."""
        now = self.clock()
        timed = self._timed
        out: list[Release[T]] = []
        while timed and (not timed[0].waiting or timed[0].deadline <= now):
            entry = timed.popleft()
            if entry.waiting:
                out.append(self._release_head(entry.anonymous_id, now, force=True))
        return out

    def next_deadline(self) -> float | None:
        """When the next wait runs out (on the line's clock), or None when nothing waits."""
        self._skip_released()
        return self._timed[0].deadline if self._timed else None

    def drop(self, should_drop: Callable[[T], bool]) -> tuple[list[T], list[Release[T]]]:
        """Remove the items `should_drop` selects (a revoked partition's: its new owner redoes them).
        Returns them, and the items that only kept their place behind them and must leave now."""
        dropped: list[T] = []
        released: list[Release[T]] = []
        for anonymous_id in list(self.by_id):
            queue = self.by_id[anonymous_id]
            kept: deque[_Entry[T]] = deque()
            for entry in queue:
                if should_drop(entry.item):
                    entry.waiting = False
                    dropped.append(entry.item)
                else:
                    kept.append(entry)
            if len(kept) == len(queue):
                continue
            self._count -= len(queue) - len(kept)
            self.by_id[anonymous_id] = kept
            if kept and kept[0].deadline == float("-inf"):
                released.append(self._release_head(anonymous_id, float("-inf"), force=True))
            elif not kept:
                del self.by_id[anonymous_id]
        return dropped, released

    def release_all(self) -> list[Release[T]]:
        """Everything, each anonymousId's items in order (shutdown: the batches must finish)."""
        out = [(anonymous_id, self.release(anonymous_id)) for anonymous_id in list(self.by_id)]
        self._timed.clear()
        return out

    def _oldest(self) -> _Entry[T]:
        self._skip_released()
        return self._timed[0]

    def _skip_released(self) -> None:
        timed = self._timed
        while timed and not timed[0].waiting:
            timed.popleft()

    def _release_head(self, anonymous_id: str, now: float, *, force: bool) -> Release[T]:
        """Pop the head of `anonymous_id`'s queue (when due, or `force`), then every entry behind it
        that is due too or has no wait of its own, so the next head waits for itself again."""
        queue = self.by_id[anonymous_id]
        items: list[T] = []
        while queue and (force or queue[0].deadline <= now):
            entry = queue.popleft()
            entry.waiting = False
            items.append(entry.item)
            force = False
        self._count -= len(items)
        if not queue:
            del self.by_id[anonymous_id]
        return anonymous_id, items
