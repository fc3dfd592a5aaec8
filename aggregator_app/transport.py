"""A faust transport that hands agents whole fetched batches of a partition.

Faust delivers records one at a time: every record becomes an event that
passes a task switch, a queue and the stream's bookkeeping. On two cores that
path alone tops out at a few thousand records per second, below what the
service must sustain. For the topics named in :data:`BATCHED_TOPICS`, this
transport's consumer groups what one fetch returned by partition and delivers
each group as a single record whose value is the list of the fetched records
(:class:`faust.types.tuples.Message`, in offset order). The agent reads that
list with the ``records`` codec, which leaves it as it is.

Offsets stay right: the batch record carries the offset of its last record, and
the offsets before it are registered as a gap (faust's own mechanism for
offsets that carry no record, as in compacted topics), so that acknowledging
the batch commits all of it, and nothing of it before it is acknowledged. Any other
topic (table changelogs among them) is delivered one record at a time, as
faust does.

Fetch wait: aiokafka keeps one fetch request in flight per broker, and a
request leaves out the partitions whose fetched records are still waiting to be
handed out. faust asks the broker to hold a fetch up to 1.5 s when none of its
partitions has data, so while the busy partitions' records are processed, the
next request (for the quiet partitions only) is held for the full 1.5 s and the
busy partitions are not fetched again until it returns: the worker then idles
more than half the time under load. This transport's consumer asks the broker
to hold a fetch :data:`FETCH_MAX_WAIT_MS` at most.

The transport is chosen by the broker URL scheme ``kafka+batches://``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from faust.serializers import codecs
from faust.transport.consumer import ensure_TP
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ConsumerMessage

__all__ = [
    "BATCHED_TOPICS",
    "FETCH_MAX_WAIT_MS",
    "SCHEME",
    "BatchingConsumer",
    "BatchingTransport",
]

logger = logging.getLogger(__name__)

SCHEME = "kafka+batches"

#: Longest the broker holds a fetch that finds no data (faust's own: 1500 ms).
FETCH_MAX_WAIT_MS = 20

#: Names of the topics delivered as batches; the agents add theirs.
BATCHED_TOPICS: set[str] = set()


class _RecordsCodec(codecs.Codec):
    """Leaves a batch (a list of records) as it is: the value is no bytes."""

    def _loads(self, s: Any) -> Any:
        return s

    def _dumps(self, s: Any) -> Any:
        return s


class BatchingConsumer(faust_aiokafka.Consumer):
    """Delivers the records of :data:`BATCHED_TOPICS` one fetched batch at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The offset of the last record delivered in a batch, per partition.
        self._delivered: dict[TP, int] = {}

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self._delivered.pop(ensure_TP(partition), None)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        self._delivered.clear()

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        await super().on_partitions_revoked(revoked)
        self._forget_delivered(revoked)

    async def on_partitions_assigned(
        self, assigned: set[TP], generation_id: int = 0
    ) -> None:
        # A new assignment reads from the committed offsets again.
        self._forget_delivered(assigned)
        await super().on_partitions_assigned(assigned, generation_id)

    def _new_consumer_thread(self) -> ShortFetchWaitThread:
        return ShortFetchWaitThread(self, loop=self.loop, beacon=self.beacon)

    def _forget_delivered(self, tps: set[TP]) -> None:
        for tp in tps:
            self._delivered.pop(ensure_TP(tp), None)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        batches: dict[TP, list[Message]] = {}
        async for tp, message in super().getmany(timeout):
            if tp.topic in BATCHED_TOPICS:
                batches.setdefault(tp, []).append(message)
            else:
                yield tp, message

        for tp, messages in batches.items():
            fresh = self._not_delivered(tp, messages)
            if fresh:
                yield tp, await self._batch_message(tp, fresh)

    def _not_delivered(self, tp: TP, messages: list[Message]) -> list[Message]:
        """Drop the records delivered already, and remember the last one.

        Faust drops a record fetched again one at a time (its read offset);
        inside a batch it would pass with the batch, and be processed twice.
        A seek (rebalance, recovery) asks for records to be read again, so it
        forgets what was delivered.
        """
        delivered = self._delivered.get(tp)
        self._delivered[tp] = messages[-1].offset
        if delivered is None or messages[0].offset > delivered:
            return messages
        fresh = [message for message in messages if message.offset > delivered]
        logger.info(
            "transport: records fetched again dropped: tp=%s dropped=%d",
            tp,
            len(messages) - len(fresh),
        )
        return fresh

    async def _batch_message(self, tp: TP, messages: list[Message]) -> Message:
        first, last = messages[0], messages[-1]
        if last.offset > first.offset:
            # Acknowledging the batch acknowledges every offset it holds.
            await self._add_gap(tp, first.offset, last.offset - 1)
        # As if the record before the last had been delivered: the consumer
        # sees no gap of its own to register (it would hold the last offset
        # twice, and one commit would stop short of the end).
        self._read_offset[tp] = last.offset - 1
        return ConsumerMessage(
            tp.topic,
            tp.partition,
            last.offset,
            last.timestamp,
            last.timestamp_type,
            [],
            None,
            messages,  # type: ignore[arg-type]  # a list, read by the "records" codec
            None,
            0,
            0,
            tp,
            generation_id=last.generation_id,
        )


class ShortFetchWaitThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread, with a worker consumer that waits less per fetch."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust passes 1500 to AIOKafkaConsumer and has no setting for it; the
        # fetcher reads this attribute when the consumer starts.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class BatchingTransport(faust_aiokafka.Transport):
    """The aiokafka transport of faust, with :class:`BatchingConsumer`."""

    Consumer = BatchingConsumer


codecs.register("records", _RecordsCodec())
TRANSPORTS.aliases[SCHEME] = f"{__name__}:BatchingTransport"
