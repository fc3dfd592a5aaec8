"""Records produced while one batch is processed, sent together.

Faust's ``Topic.send`` awaits each record's way into the producer, one record at
a time, and aiokafka's ``send`` then looks up metadata, hashes the key and adds
the record to its accumulator, each with futures of its own: at thousands of
records per second that alone takes a good part of a core. An :class:`Outbox`
instead appends the records of one batch to aiokafka batch builders, one per
topic partition, and hands the builders to the producer together
(``send_batch``); :class:`InFlight` acknowledges the batch only once the broker
has all of them, so an offset is only committed once everything the batch
produced is written (at least once). A failed send never acknowledges its
batch: the worker stops rather than lose a record.

Order: the records of one topic partition reach the broker in the order they
were added, within one outbox and across outboxes flushed one after another
(the builders of one flush are handed over under a lock, before the next
flush hands over its own). Table changelogs rely on it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from aggregator_app.exceptions import AggregatorError

__all__ = ["Headers", "InFlight", "Outbox", "SendFailed", "SentRecord"]

logger = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
OnSent = Callable[["SentRecord"], None]

_partitioner = DefaultPartitioner()

#: Per topic: the partition of each ``partition_key`` seen.
_partition_cache: dict[str, dict[bytes, int]] = {}
_PARTITION_CACHE_SIZE = 100_000

#: Per aiokafka producer: held while one flush hands its builders over.
_hand_over_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


class SendFailed(AggregatorError):
    """The broker did not take a record this worker produced."""


@dataclass(frozen=True, slots=True)
class SentRecord:
    """Where the broker wrote one record (what ``on_sent`` callbacks get)."""

    topic: str
    partition: int
    offset: int

    @property
    def topic_partition(self) -> TopicPartition:
        """Return the record's ``TopicPartition``, as faust's stores take it."""
        return TopicPartition(self.topic, self.partition)


@dataclass(slots=True)
class _Batch:
    """One aiokafka batch builder of one topic partition, and its callbacks."""

    topic: str
    partition: int
    builder: Any
    records: int = 0
    on_sent: list[tuple[int, OnSent]] = field(default_factory=list)


class Outbox:
    """Collects the records of one batch; :meth:`flush` sends and waits for them.

    Args:
        producer: the app's faust producer (aiokafka driver); its aiokafka
            producer takes the batches.
    """

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], _Batch] = {}
        self._batches: list[_Batch] = []
        self._records = 0

    def __len__(self) -> int:
        return self._records

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        partition_key: bytes | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
        on_sent: OnSent | None = None,
    ) -> None:
        """Add one record; ``on_sent`` gets where it was written, once it is.

        Without ``partition`` the record goes where Kafka's default
        partitioner (murmur2, as the Java client) puts ``partition_key``,
        else its key, or to a random partition when it has neither. A
        ``partition_key`` keeps records of one thing (a camera) together
        whatever their keys, and its partition is looked up once.
        """
        if partition is None and partition_key is not None:
            partition = await self._cached_partition_of(topic, partition_key)
        elif partition is None:
            partition = await self._partition_of(topic, key)
        batch = self._open.get((topic, partition))
        if batch is None:
            batch = self._new_batch(topic, partition)

        appended = batch.builder.append(
            timestamp=timestamp_ms, key=key, value=value, headers=headers or []
        )
        if appended is None:
            batch = self._new_batch(topic, partition)
            appended = batch.builder.append(
                timestamp=timestamp_ms, key=key, value=value, headers=headers or []
            )
            if appended is None:
                raise SendFailed(
                    f"a record does not fit in one batch: topic={topic} "
                    f"bytes={len(value or b'') + len(key or b'')}"
                )

        if on_sent is not None:
            batch.on_sent.append((batch.records, on_sent))
        batch.records += 1
        self._records += 1

    async def flush(self) -> int:
        """Send every batch and wait until the broker has every record.

        Returns how many records there were.

        Raises:
            SendFailed: a record was refused or could not be delivered.
        """
        batches, records = self._batches, self._records
        self._open, self._batches, self._records = {}, [], 0
        if not batches:
            return 0

        try:
            futures = await self._hand_over(batches)
            results = await asyncio.gather(*futures)
        except Exception as exc:
            raise SendFailed(f"a record was not delivered: {exc!r}") from exc

        for batch, metadata in zip(batches, results, strict=True):
            for index, callback in batch.on_sent:
                callback(
                    SentRecord(batch.topic, batch.partition, metadata.offset + index)
                )
        return records

    async def _hand_over(self, batches: list[_Batch]) -> list[Awaitable[Any]]:
        client = self._client()
        lock = _hand_over_locks.get(client)
        if lock is None:
            lock = _hand_over_locks[client] = asyncio.Lock()
        async with lock:
            return [
                await client.send_batch(
                    batch.builder, batch.topic, partition=batch.partition
                )
                for batch in batches
            ]

    def _new_batch(self, topic: str, partition: int) -> _Batch:
        batch = _Batch(topic, partition, self._client().create_batch())
        self._open[(topic, partition)] = batch
        self._batches.append(batch)
        return batch

    async def _cached_partition_of(self, topic: str, key: bytes) -> int:
        cache = _partition_cache.setdefault(topic, {})
        partition = cache.get(key)
        if partition is None:
            if len(cache) >= _PARTITION_CACHE_SIZE:
                cache.clear()
            partition = cache[key] = await self._partition_of(topic, key)
        return partition

    async def _partition_of(self, topic: str, key: bytes | None) -> int:
        partitions = sorted(await self._client().partitions_for(topic))
        return int(_partitioner(key, partitions, partitions))

    def _client(self) -> Any:
        # faust's aiokafka driver keeps its aiokafka producer here; it has no
        # public accessor, and batches need the aiokafka producer itself.
        return self._producer._ensure_producer()


class InFlight:
    """Batches whose records are on their way to the broker.

    Waiting for the broker after every batch would leave the agent idle for a
    round trip per batch. Instead, a processed batch is handed over here with
    its outbox and its acknowledgement: the agent goes on with the next batch
    at once, and the batch is acknowledged (its offsets may then be
    committed) only once the broker has every record it produced. At most
    ``limit`` batches are on their way; the agent waits for a free slot.

    A failed send never acknowledges its batch: ``on_failure`` is awaited
    (the app stops the worker), and the batch is read again by the next one.
    """

    def __init__(
        self, limit: int, on_failure: Callable[[BaseException], Awaitable[None]]
    ) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[None]] = set()
        self._records = 0

    @property
    def records(self) -> int:
        """Return how many records are handed over and not yet written."""
        return self._records

    async def hand_over(self, outbox: Outbox, ack: Callable[[], object]) -> None:
        """Acknowledge with ``ack`` once every record of ``outbox`` is written."""
        await self._slots.acquire()
        self._records += len(outbox)
        task = asyncio.ensure_future(self._settle(outbox, ack))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, outbox: Outbox, ack: Callable[[], object]) -> None:
        records = len(outbox)
        try:
            await outbox.flush()
        except SendFailed as exc:
            logger.error("outbox: batch not acknowledged: error=%r", exc)
            await self._on_failure(exc)
            return
        finally:
            self._records -= records
            self._slots.release()
        ack()
