"""Writes raw messages to Kafka and lets a request await the broker's acknowledgement of every one.

librdkafka runs delivery callbacks on whichever thread calls `poll`; here that is one daemon
thread, which hands each result to the asyncio loop with `call_soon_threadsafe` (futures are not
thread-safe). The producer is the shared wrapper (idempotent, acks=all) with `message.timeout.ms`
set to the request's acknowledgement timeout, so librdkafka gives up on a message at about the
time its request is answered 503: a message we refused is then not stored later behind the SDK's
back (which would turn its retry into a duplicate).

A request's messages (one an event) are all queued before any is awaited, so a batch costs one
round trip however many partitions its users hash to. Failure is per message, so a request
answered 503 may have had some of its events stored: the SDK's retry writes those again, and
destinations dedupe them by their messageId (docs/ARCHITECTURE.md#guarantees).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient

from worker import logs
from worker.kafka.clients import KafkaClients
from worker.kafka.producer import Producer

log = logs.get(__name__)

# Our own wait outlasts librdkafka's message timeout by this much, so its report normally comes first.
_ACK_GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.1
# Failed requests in a row after which the producer is replaced (see `_count_outcome`).
_FAILURES_BEFORE_NEW_PRODUCER = 3
# librdkafka's own default for queue.buffering.max.messages, should a configuration unset ours.
_LIBRDKAFKA_QUEUE_MESSAGES = 100_000


class WriteFailed(Exception):
    """The broker did not acknowledge the message; the request must be answered 503."""


class RawWriter:
    def __init__(self, clients: KafkaClients, topic: str, ack_timeout: float) -> None:
        self.topic = topic
        self.ack_timeout = ack_timeout
        self._clients = clients
        self._overrides = {"message.timeout.ms": str(max(1, int(ack_timeout * 1000)))}
        self._producer = clients.producer(self._overrides)
        # A produce into a full local queue waits on the calling thread (the shared wrapper serves
        # callbacks until there is room), and here that thread is the event loop: a request that
        # would not fit is answered 503 instead, before any of its messages is queued.
        self._queue_limit = int(
            clients.producer_config(self._overrides).get("queue.buffering.max.messages", _LIBRDKAFKA_QUEUE_MESSAGES)
        )
        self._retired: list[tuple[Producer, float]] = []  # replaced producers (and when), polled a while
        self._needs_new_producer = False
        self._failures_in_a_row = 0
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._serve_callbacks, name="collector-delivery", daemon=True)
        self._admin: AdminClient | None = None

    def start(self) -> None:
        self._poller.start()

    def _serve_callbacks(self) -> None:
        while not self._stopping.is_set():
            self._poll(self._producer, _POLL_SECONDS)
            for retired, retired_at in list(self._retired):
                self._poll(retired, 0)
                # Its messages report within message.timeout.ms; after that nobody waits for it.
                if len(retired) == 0 or time.monotonic() - retired_at > self.ack_timeout + _ACK_GRACE_SECONDS:
                    self._retired.remove((retired, retired_at))

    def _poll(self, producer: Producer, timeout: float) -> None:
        try:
            producer.poll(timeout)
        except KafkaException as exc:  # librdkafka raises fatal errors from poll (no error_cb is set)
            self._count_outcome(failed=True, fatal=exc.args[0].fatal())

    async def write_all(self, messages: Sequence[tuple[bytes, str | None]]) -> None:
        """Return once the broker acknowledged every (value, key) message (all in-sync replicas);
        raise WriteFailed if any was not. Messages are queued in order, so two events of one user
        (one key, one partition) are stored in the order they came, the idempotent producer keeping
        that order through its retries."""
        loop = asyncio.get_running_loop()
        self._replace_stuck_producer()
        queued = len(self._producer)
        if queued + len(messages) > self._queue_limit:
            raise WriteFailed(
                f"{queued} messages are already waiting for Kafka; {len(messages)} more would exceed "
                f"queue.buffering.max.messages ({self._queue_limit})"
            )
        pending: list[asyncio.Future[KafkaError | None]] = []
        for value, key in messages:
            acknowledged: asyncio.Future[KafkaError | None] = loop.create_future()
            try:
                self._producer.produce(self.topic, value, key, _reporter(loop, acknowledged))
            except KafkaException as exc:
                # Those already queued may still be stored: the 503 tells the SDK to send them again.
                self._count_outcome(failed=True, fatal=exc.args[0].fatal())
                raise WriteFailed(f"produce failed: {exc.args[0].str()}") from None
            pending.append(acknowledged)
        try:
            errors = await asyncio.wait_for(asyncio.gather(*pending), self.ack_timeout + _ACK_GRACE_SECONDS)
        except TimeoutError:
            self._count_outcome(failed=True)
            raise WriteFailed(f"no acknowledgement from the broker in {self.ack_timeout:g}s") from None
        failures = [error for error in errors if error is not None]
        self._count_outcome(failed=bool(failures), fatal=any(error.fatal() for error in failures))
        if failures:
            raise WriteFailed(
                f"the broker did not acknowledge {len(failures)} of {len(messages)} messages: {failures[0].str()}"
            )

    def _count_outcome(self, failed: bool, fatal: bool = False) -> None:
        """One outcome a request (however many messages it wrote), so the threshold means the same
        for a batch as for one event. A fatal error, or failures piling up with no success between
        them, mean the producer may be stuck rather than the broker down: an idempotent producer
        whose broker lost its state (a restarted Tansu answers UNKNOWN_PRODUCER_ID forever) never
        recovers by itself, while a new one gets a fresh producer id."""
        if not failed:
            self._failures_in_a_row = 0
            return
        self._failures_in_a_row += 1
        if fatal or self._failures_in_a_row >= _FAILURES_BEFORE_NEW_PRODUCER:
            self._needs_new_producer = True

    def _replace_stuck_producer(self) -> None:
        if not self._needs_new_producer:
            return
        self._needs_new_producer = False
        self._failures_in_a_row = 0
        log.warning("deliveries keep failing; replacing the producer", topic=self.topic)
        # The poll thread keeps serving the old one until its queued messages have reported
        # (they fail within message.timeout.ms), so their requests still get their answer.
        self._retired.append((self._producer, time.monotonic()))
        self._producer = self._clients.producer(self._overrides)

    def topic_available(self, timeout: float) -> bool:
        """Whether the broker answers metadata for our topic now (readiness). Blocking: call off the loop."""
        if self._admin is None:
            self._admin = self._clients.admin()
        try:
            metadata = self._admin.list_topics(self.topic, timeout=timeout)
        except KafkaException:
            return False
        topic = metadata.topics.get(self.topic)
        return topic is not None and topic.error is None and bool(topic.partitions)

    def close(self, timeout: float) -> int:
        """Stop the poll thread and flush what is still queued. Returns how many messages were left."""
        self._stopping.set()
        if self._poller.is_alive():
            self._poller.join()
        deadline = time.monotonic() + timeout
        remaining = 0
        for producer in [*(retired for retired, _at in self._retired), self._producer]:
            remaining += producer.flush(max(0.0, deadline - time.monotonic()))
        return remaining


def _reporter(
    loop: asyncio.AbstractEventLoop, acknowledged: asyncio.Future[KafkaError | None]
) -> Callable[[KafkaError | None, Message], None]:
    """A delivery callback (run on the poll thread) that hands its result to the loop: futures are not thread-safe."""

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, acknowledged, error)

    return on_delivery


def _settle(future: asyncio.Future[KafkaError | None], error: KafkaError | None) -> None:
    if not future.done():  # the request may have given up waiting already
        future.set_result(error)
