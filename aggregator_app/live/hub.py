"""The fan-out of one stream: one reader of its topics, many clients.

A :class:`Hub` reads every partition of its topics with a consumer of its own
(no consumer group: every worker reads everything, whichever worker
published it) from their ends, and offers each record to every
:class:`Subscriber`. A subscriber has a bounded queue; when it is full the
subscriber is dropped at once, so a slow or stalled client never holds up
the hub, the worker or the other clients.

Resuming (:meth:`Hub.catch_up`): a client that comes back with a cursor is
subscribed first, at the hub's position of that moment, so that every later
record lands in its queue; the records between its cursor and that position
are then read from the topic with a consumer of their own and sent before
the queue. Every record is therefore sent once, none missed. The topic, not
the store, fills the gap: its offsets are the cursor, it holds the records
in the order they were published, and it keeps them by size (2 GiB per
partition, see :data:`aggregator_app.topics.TOPIC_CONFIG`); the store has
no offsets and stores an event again as a new version. A cursor older than
what the topic still holds is told so (a ``gap`` notice) and resumes at the
oldest record there is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from aggregator_app.live.cursor import format_cursor
from aggregator_app.live.filters import Facets, StreamFilter

__all__ = [
    "TOO_SLOW",
    "Decoded",
    "Gap",
    "Hub",
    "HubStats",
    "Item",
    "Subscriber",
]

logger = logging.getLogger(__name__)

#: The start of the reason given to a client dropped because its queue filled.
TOO_SLOW = "too slow"

_FETCH_TIMEOUT_MS = 500
_MAX_RECORDS = 1000
_FAN_OUT_CHUNK = 50


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a record holds for clients: its JSON and its events' facets."""

    kind: str
    body: bytes
    facets: tuple[Facets, ...]


Decode = Callable[[ConsumerRecord], Decoded | None]


class Item:
    """One record of a stream, with the cursor after it; framed once for all."""

    __slots__ = ("_sse", "_ws", "cursor", "decoded", "index", "offset")

    def __init__(self, *, index: int, offset: int, cursor: str, decoded: Decoded):
        self.index = index
        self.offset = offset
        self.cursor = cursor
        self.decoded = decoded
        self._sse: bytes | None = None
        self._ws: str | None = None

    @property
    def sse_frame(self) -> bytes:
        """Return the SSE frame: ``id:`` the cursor, ``data:`` the JSON."""
        if self._sse is None:
            self._sse = b"id: %s\ndata: %s\n\n" % (
                self.cursor.encode(),
                self.decoded.body,
            )
        return self._sse

    @property
    def ws_text(self) -> str:
        """Return the WebSocket message: ``{"cursor", "kind", "event"}``."""
        if self._ws is None:
            body = self.decoded.body.decode()
            self._ws = (
                f'{{"cursor":"{self.cursor}","kind":"{self.decoded.kind}",'
                f'"event":{body}}}'
            )
        return self._ws


@dataclass(frozen=True, slots=True)
class Gap:
    """Records a resuming client cannot get: the topic no longer holds them."""

    partition_index: int
    from_offset: int
    to_offset: int


@dataclass
class HubStats:
    """Counters of a hub, served as metrics."""

    records_read: int = 0
    items_sent: int = 0
    clients_dropped: int = 0
    clients_total: int = 0


@dataclass(eq=False)
class Subscriber:
    """One client of a hub: its filter, its queue, and why it was dropped.

    ``floor``: per partition, the first offset the client has not had; a
    record below it is not queued (it came through a resume already).
    ``on_drop`` is called once when the hub drops the client.
    """

    filter: StreamFilter
    queue: asyncio.Queue[Item]
    floor: list[int]
    dropped_reason: str | None = None
    on_drop: Callable[[], None] | None = None
    last_cursor: str | None = None
    _hub: Hub | None = field(default=None, repr=False)

    def offer(self, index: int, offset: int, item: Item) -> bool:
        """Queue an item if it is for this client; drop the client if it cannot."""
        if offset < self.floor[index]:
            return False
        if not self.filter.matches_any(item.decoded.facets):
            return False
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.drop(f"{TOO_SLOW}: {self.queue.maxsize} events waiting")
            return False
        return True

    def drop(self, reason: str, *, too_slow: bool = True) -> None:
        """Stop queueing for this client and tell its connection.

        ``too_slow``: counted as a dropped client (not so when the worker stops).
        """
        if self.dropped_reason is not None:
            return
        self.dropped_reason = reason
        if self._hub is not None:
            self._hub.remove(self, dropped=too_slow)
        if self.on_drop is not None:
            self.on_drop()


class Hub:
    """Reads the partitions of some topics and fans their records out.

    Args:
        name: the stream's letter in cursors (``a``, ``d``).
        topics: the topics, each with ``partitions`` partitions.
        decode: what a record holds for clients, ``None`` to skip it.
        bootstrap: Kafka's bootstrap servers.
        before_start: awaited before the first read (e.g. declare the topic).
        idle_stop_s: stop reading this long after the last client left
            (``None``: read on once started).
    """

    def __init__(
        self,
        *,
        name: str,
        topics: Sequence[str],
        partitions: int,
        decode: Decode,
        bootstrap: str,
        before_start: Callable[[], Awaitable[None]] | None = None,
        idle_stop_s: float | None = None,
    ) -> None:
        self.name = name
        self.tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        self._index = {tp: index for index, tp in enumerate(self.tps)}
        self._decode = decode
        self._bootstrap = bootstrap
        self._before_start = before_start
        self.positions: list[int] = []
        self.subscribers: set[Subscriber] = set()
        self.stats = HubStats()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._idle_stop_s = idle_stop_s
        self._idle_timer: asyncio.TimerHandle | None = None

    # Lifecycle.

    async def ensure_started(self) -> None:
        """Start reading, at the topics' ends, unless already reading."""
        async with self._lock:
            if self._task is not None and not self._task.done():
                return
            await self._close_consumer()
            if self._before_start is not None:
                await self._before_start()
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap,
                enable_auto_commit=False,
                group_id=None,
                max_partition_fetch_bytes=4 * 1024 * 1024,
            )
            try:
                await consumer.start()
                consumer.assign(self.tps)
                await consumer.seek_to_end(*self.tps)
                self.positions = [await consumer.position(tp) for tp in self.tps]
            except BaseException:  # a broker down, or the caller gave up waiting
                await asyncio.shield(consumer.stop())
                raise
            self._consumer = consumer
            self._task = asyncio.create_task(self._read(), name=f"hub-{self.name}")
            self._task.add_done_callback(self._on_read_end)
            logger.info(
                "live: hub started: stream=%s partitions=%d positions=%s",
                self.name,
                len(self.tps),
                format_cursor(self.name, self.positions),
            )

    def _on_read_end(self, task: asyncio.Task[None]) -> None:
        """Drop the clients of a hub that failed; the next client restarts it."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error(
            "live: hub stopped reading: stream=%s error=%r", self.name, task.exception()
        )
        for subscriber in list(self.subscribers):
            subscriber.drop("the stream failed; reconnect", too_slow=False)

    async def _close_consumer(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def stop(self) -> None:
        """Stop reading and drop every client."""
        for subscriber in list(self.subscribers):
            subscriber.drop("the worker is stopping", too_slow=False)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close_consumer()

    # Clients.

    def subscribe(
        self,
        stream_filter: StreamFilter,
        *,
        queue_events: int,
        cursor: list[int] | None,
    ) -> Subscriber:
        """Add a client; it gets every record after the hub's position now.

        With a ``cursor`` ahead of the hub somewhere, records below it are
        not queued for that partition.
        """
        floor = list(self.positions)
        if cursor is not None:
            floor = [max(a, b) for a, b in zip(floor, cursor, strict=True)]
        subscriber = Subscriber(
            filter=stream_filter,
            queue=asyncio.Queue(maxsize=queue_events),
            floor=floor,
            _hub=self,
        )
        self.subscribers.add(subscriber)
        self.stats.clients_total += 1
        return subscriber

    def remove(self, subscriber: Subscriber, *, dropped: bool = False) -> None:
        """Forget a client (it left, or it was dropped)."""
        if subscriber in self.subscribers:
            self.subscribers.discard(subscriber)
            self._stop_later_if_idle()
            if dropped:
                self.stats.clients_dropped += 1
                logger.warning(
                    "live: client dropped: stream=%s reason=%s clients=%d",
                    self.name,
                    subscriber.dropped_reason,
                    len(self.subscribers),
                )

    def _stop_later_if_idle(self) -> None:
        if self.subscribers or self._idle_stop_s is None:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._idle_stop_s, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if not self.subscribers and self._task is not None:
            asyncio.ensure_future(self._stop_reading_if_idle())

    async def _stop_reading_if_idle(self) -> None:
        """Stop reading when no client came back; the next one starts it again."""
        async with self._lock:
            if self.subscribers or self._task is None:
                return
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            await self._close_consumer()
            logger.info("live: hub stopped, no client left: stream=%s", self.name)

    # Reading.

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=_FETCH_TIMEOUT_MS, max_records=_MAX_RECORDS
                )
            except KafkaError as exc:
                logger.warning("live: hub read failed, retrying: error=%r", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                index = self._index[tp]
                for first in range(0, len(records), _FAN_OUT_CHUNK):
                    self._fan_out(index, records[first : first + _FAN_OUT_CHUNK])
                    # Let the clients' connections write before the next chunk:
                    # a burst read from the topic must not fill a healthy queue.
                    await asyncio.sleep(0)

    def _fan_out(self, index: int, records: Sequence[ConsumerRecord]) -> None:
        """Offer a partition's records to every client, in order, without waiting."""
        for record in records:
            self.positions[index] = record.offset + 1
            self.stats.records_read += 1
            if not self.subscribers:
                continue
            decoded = self._decode(record)
            if decoded is None:
                continue
            item = Item(
                index=index,
                offset=record.offset,
                cursor=format_cursor(self.name, self.positions),
                decoded=decoded,
            )
            for subscriber in list(self.subscribers):
                if subscriber.offer(index, record.offset, item):
                    self.stats.items_sent += 1

    async def catch_up(
        self, *, start: list[int], stop: list[int], stream_filter: StreamFilter
    ) -> AsyncGenerator[Item | Gap, None]:
        """Yield the records from ``start`` up to ``stop`` that pass the filter.

        1. Find the partitions with records between the two, and what the
           topic still holds of them; what it no longer holds is a ``Gap``.
        2. Read those partitions from ``start`` until every one is at ``stop``,
           giving each record the cursor of the catch-up so far.
        """
        # Step 1.
        todo = [i for i, (a, b) in enumerate(zip(start, stop, strict=True)) if a < b]
        if not todo:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            tps = [self.tps[i] for i in todo]
            consumer.assign(tps)
            firsts = await consumer.beginning_offsets(tps)
            positions = list(start)
            for index, tp in zip(todo, tps, strict=True):
                if positions[index] < firsts[tp]:
                    yield Gap(index, positions[index], min(firsts[tp], stop[index]))
                    positions[index] = firsts[tp]
                consumer.seek(tp, positions[index])

            # Step 2.
            reading = self._read_until(consumer, positions, stop, stream_filter)
            async for item in reading:
                yield item
        finally:
            await consumer.stop()

    async def _read_until(
        self,
        consumer: AIOKafkaConsumer,
        positions: list[int],
        stop: list[int],
        stream_filter: StreamFilter,
    ) -> AsyncGenerator[Item, None]:
        while any(positions[i] < stop[i] for i in range(len(stop))):
            batches = await consumer.getmany(timeout_ms=_FETCH_TIMEOUT_MS)
            for tp, records in batches.items():
                index = self._index[tp]
                for record in records:
                    if record.offset >= stop[index]:
                        break
                    positions[index] = record.offset + 1
                    decoded = self._decode(record)
                    if decoded is None or not stream_filter.matches_any(decoded.facets):
                        continue
                    cursor = format_cursor(self.name, positions)
                    yield Item(
                        index=index,
                        offset=record.offset,
                        cursor=cursor,
                        decoded=decoded,
                    )
            for index in range(len(stop)):
                if positions[index] < stop[index]:
                    # Offsets without a record (transaction markers) move
                    # the position too; never past ``stop``.
                    read_to = await consumer.position(self.tps[index])
                    positions[index] = min(stop[index], max(positions[index], read_to))
