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

The transport is chosen by the broker URL scheme ``kafka+batches://``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from faust.serializers import codecs
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ConsumerMessage

__all__ = ["BATCHED_TOPICS", "SCHEME", "BatchingConsumer", "BatchingTransport"]

SCHEME = "kafka+batches"

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

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        batches: dict[TP, list[Message]] = {}
        async for tp, message in super().getmany(timeout):
            if tp.topic in BATCHED_TOPICS:
                batches.setdefault(tp, []).append(message)
            else:
                yield tp, message

        for tp, messages in batches.items():
            yield tp, await self._batch_message(tp, messages)

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


class BatchingTransport(faust_aiokafka.Transport):
    """The aiokafka transport of faust, with :class:`BatchingConsumer`."""

    Consumer = BatchingConsumer


codecs.register("records", _RecordsCodec())
TRANSPORTS.aliases[SCHEME] = f"{__name__}:BatchingTransport"
