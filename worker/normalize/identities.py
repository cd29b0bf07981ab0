"""The identity map: anonymousId -> userId, learnt from identify and alias calls.

It lives in the compacted topic `segment.identities` (key anonymousId, value userId). Every
normaliser instance reads the whole topic into a bounded in-memory LRU, because an anonymous event
and the identify that names its user are keyed differently (anonymousId vs userId) and so land on
different partitions, possibly in different processes. Updates are eventually consistent; an
anonymous event that some destination cannot use without a userId waits a short, bounded time for
its link (worker.normalize.stitching), which `IdentityMap.watch` tells the normaliser about.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

from confluent_kafka import KafkaException

from worker import logs
from worker.kafka.clients import KafkaClients
from worker.kafka.reading import TopicMissing, assign_all, read_until_quiet

log = logs.get(__name__)


class IdentityMap:
    """An LRU shared by the reader thread (puts) and the processing thread (gets, puts).

    Reads and repeated puts take no lock: single OrderedDict operations are atomic under the GIL,
    and the worst a race can do is refresh the recency of an entry just evicted (KeyError, ignored).
    Changes take the lock so insert-and-evict stays one step.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._changes: deque[str] | None = None

    def _touch(self, anonymous_id: str) -> None:
        try:  # noqa: SIM105 - contextlib.suppress costs more, and this runs per event
            self._entries.move_to_end(anonymous_id)
        except KeyError:
            pass

    def get(self, anonymous_id: str) -> str | None:
        user_id = self._entries.get(anonymous_id)
        if user_id is not None:
            self._touch(anonymous_id)
        return user_id

    def put(self, anonymous_id: str, user_id: str) -> bool:
        """Record a link; True when it is new or changed (so it is worth publishing)."""
        if self._entries.get(anonymous_id) == user_id:  # the common case: already known
            self._touch(anonymous_id)
            return False
        with self._lock:
            self._entries[anonymous_id] = user_id
            self._entries.move_to_end(anonymous_id)
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        if self._changes is not None:
            self._changes.append(anonymous_id)
        return True

    def watch(self, max_pending: int = 100_000) -> deque[str]:
        """From now on, every new or changed link's anonymousId is appended to the returned deque,
        from whichever thread put it; the watcher pops them (deque appends and pops are thread-safe).

        Appended after the map holds the link, so a watcher that read the map and found no link
        finds the notice later. Unfiltered, so that no interest set is shared between threads; the
        bound only matters if the watcher stops popping, and a missed notice merely leaves an event
        waiting until its deadline (when the map is read again anyway)."""
        self._changes = deque(maxlen=max_pending)
        return self._changes

    def forget(self, anonymous_id: str) -> None:
        with self._lock:
            self._entries.pop(anonymous_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class IdentityTopicReader:
    """Reads every partition of the identities topic from the beginning, then follows it.

    It uses `assign`, not a consumer group: every instance needs every partition, and commits
    nothing (the topic is re-read in full at start-up; compaction keeps that cheap).
    """

    def __init__(self, clients: KafkaClients, topic: str, identities: IdentityMap) -> None:
        self.topic = topic
        self.identities = identities
        self._consumer = clients.reader("identities-reader")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _apply(self, messages: list) -> int:
        applied = 0
        for message in messages:
            if message.error() is not None:
                continue
            key = message.key()
            if not key:
                continue
            value = message.value()
            if value is None:  # a tombstone: the link was deleted
                self.identities.forget(key.decode())
            else:
                self.identities.put(key.decode(), value.decode())
            applied += 1
        return applied

    def start(self, catch_up_timeout: float = 30.0, idle: float = 0.5) -> int:
        """Load the topic up to its current end, then follow it in a thread; returns links loaded."""
        try:
            assignment = assign_all(self._consumer, [self.topic])
        except TopicMissing:
            raise KafkaException(f"topic {self.topic} does not exist; run `segment-worker topics create`") from None
        high = {tp.partition: self._consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in assignment}

        def at_high_watermarks() -> bool:
            positions = {tp.partition: tp.offset for tp in self._consumer.position(assignment)}
            return all(positions.get(p, -1) >= h or h == 0 for p, h in high.items())

        # Read to the high watermarks, then until the topic has been quiet for `idle` seconds: the
        # embedded broker can under-report a watermark, and a quiet topic is caught up either way.
        deadline = time.monotonic() + catch_up_timeout
        loaded = 0
        for message in read_until_quiet(self._consumer, idle, deadline, caught_up=at_high_watermarks, grace=0.0):
            loaded += self._apply([message])
        if time.monotonic() >= deadline:
            log.warning("identity map not fully loaded before the deadline", loaded=loaded)
        log.info("identity map loaded", links=loaded, entries=len(self.identities))
        self._thread = threading.Thread(target=self._follow, name="identities-reader", daemon=True)
        self._thread.start()
        return loaded

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._apply(self._consumer.consume(1000, 0.2))
            except Exception as exc:  # keep following; a missed link only leaves events anonymous
                log.warning("identity reader error", error=str(exc))
                time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()
