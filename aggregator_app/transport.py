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
acknowledging it adds the offsets of every record it holds to faust's
acknowledged offsets (not a faust gap: a gap belongs to no batch, and the ack
of one batch would take in the gap of another still in flight), so that the
batch is committed all of it, and nothing of it before it is acknowledged.
Any other topic (table changelogs among them) is delivered one record at a
time, as faust does.

Fetch wait: aiokafka keeps one fetch request in flight per broker, and a
request leaves out the partitions whose fetched records are still waiting to be
handed out. faust asks the broker to hold a fetch up to 1.5 s when none of its
partitions has data, so while the busy partitions' records are processed, the
next request (for the quiet partitions only) is held for the full 1.5 s and the
busy partitions are not fetched again until it returns: the worker then idles
more than half the time under load. This transport's consumer asks the broker
to hold a fetch :data:`FETCH_MAX_WAIT_MS` at most.

Rebalances: faust forgets a revoked partition's gaps and acknowledgements
when the revocation starts, and reads it again from its committed offset once
it is assigned. A batch fetched before that must not reach the agent, nor be
acknowledged, afterwards: see :meth:`BatchingConsumer.getmany` and
:meth:`BatchingConsumer.ack`.

The transport is chosen by the broker URL scheme ``kafka+batches://``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

from faust.serializers import codecs
from faust.transport.consumer import ensure_TP
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ConsumerMessage, ack_lock

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
        # How many revocations of a partition began: a batch collected
        # before one is stale.
        self._resets: dict[TP, int] = {}
        # The batches delivered since their partition was last assigned: the
        # only ones whose acknowledgement counts.
        self._live_batches: weakref.WeakSet[Message] = weakref.WeakSet()

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self._delivered.pop(ensure_TP(partition), None)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        self._delivered.clear()

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        # Before anything awaits: faust clears the partitions' gaps and acks
        # first thing, and a batch yielded from then on would be stale.
        self._reset(revoked)
        self._forget_live(revoked)
        await super().on_partitions_revoked(revoked)
        self._forget_delivered(revoked)

    def _reset(self, tps: set[TP]) -> None:
        for tp in tps:
            tp = ensure_TP(tp)
            self._resets[tp] = self._resets.get(tp, 0) + 1

    def _epoch(self, tp: TP) -> int:
        """What changes when a batch of ``tp`` collected before turns stale."""
        return self._resets.get(tp, 0)

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

    def _forget_live(self, tps: set[TP]) -> None:
        revoked = {ensure_TP(tp) for tp in tps}
        for message in list(self._live_batches):
            if message.tp in revoked:
                self._live_batches.discard(message)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        """Yield the fetched records, those of :data:`BATCHED_TOPICS` as batches.

        The batches of one fetch are yielded one after the other, and the
        fetcher awaits the agent's buffer at each: a rebalance can begin
        between two. Faust's own loop stops at a changed generation, but this
        one yields what it collected, so a batch fetched under the old
        assignment would register its gap in the partition state faust has
        just cleared (and nothing clears it again), and then be skipped by the
        stream as of an old generation or a stopped flow, which acknowledges
        it unprocessed: the next commit then takes the batch's offsets as
        done. Those records were lost (the seek after the rebalance starts at
        that commit). So the batches left when a revocation began, or while
        the flow is stopped, are dropped here untouched: the partition is
        read again from its committed offset once it is assigned.
        """
        batches: dict[TP, list[Message]] = {}
        async for tp, message in super().getmany(timeout):
            if tp.topic in BATCHED_TOPICS:
                batches.setdefault(tp, []).append(message)
            else:
                yield tp, message
        epochs = {tp: self._epoch(tp) for tp in batches}

        for tp, messages in batches.items():
            if self._stale(epochs[tp], tp, messages):
                continue
            self._note_fetched_again(tp, messages)
            # From the check above to the yield nothing awaits: a batch is
            # either dropped with no trace or delivered with its gap.
            yield tp, self._batch_message(tp, messages)

    def _stale(self, epoch: int, tp: TP, messages: list[Message]) -> bool:
        """Whether a rebalance began since the batch was collected."""
        if epoch == self._epoch(tp) and self.flow_active:
            return False
        logger.info(
            "transport: batch of a past assignment dropped: tp=%s first=%d last=%d",
            tp,
            messages[0].offset,
            messages[-1].offset,
        )
        return True

    def ack(self, message: Message) -> bool:
        """Acknowledge a batch delivered under the partition's assignment only.

        A batch delivered before its partition was revoked is read again from
        the committed offset after the rebalance; its gap went with the
        revocation. Its acknowledgement would stand alone in the new state: a
        stream skipping it (old generation, stopped flow) acknowledges it
        unprocessed, and even a processed one would let a commit jump over
        records before it that were not. It is marked done (the revocation's
        wait for pending messages ends) but commits nothing; at least once,
        its records are processed again.
        """
        if message.topic not in BATCHED_TOPICS:
            return super().ack(message)
        if message in self._live_batches:
            return self._ack_batch(message)

        with ack_lock:
            message.acked = True
            self._unacked_messages.discard(message)
        logger.info(
            "transport: ack of a past assignment ignored: tp=%s offset=%d",
            message.tp,
            message.offset,
        )
        return False

    def _ack_batch(self, message: Message) -> bool:
        """Acknowledge every offset of the batch, and none of another.

        Faust's gaps cannot say which batch an offset belongs to: the ack of
        a batch took in the gap of an earlier one still on its way to the
        broker (batches are acknowledged in the order their output is
        written, not in offset order), the commit moved past that earlier
        batch's records, and a rebalance before its ack lost them (the
        batch's last record, carried by the message itself, was read again:
        the "two records lost before a processed one" of a rebalance). So a
        batch registers no gap; its ack adds its own offsets.
        """
        with ack_lock:
            if not super().ack(message):
                return False
            tp = message.tp
            committed = self._committed_offset[tp] or 0
            records: list[Message] = message.value  # type: ignore[assignment]
            first = max(records[0].offset, committed)
            offsets = [
                o
                for o in range(first, message.offset)
                if o not in self._acked_index[tp]
            ]
            self._acked_index[tp].update(offsets)
            self._acked[tp].extend(offsets)
            return True

    def _note_fetched_again(self, tp: TP, messages: list[Message]) -> None:
        """Log the records of a batch delivered once already; they stay in it.

        Faust drops a record fetched again one at a time (its read offset).
        This transport used to drop such records from a batch, counting on the
        earlier delivery to be committed; but the earlier delivery may be one
        that is never acknowledged (faust's flow control clears an agent's
        buffer, a stream skips it) when records come again around the seek
        after an assignment, and the offsets dropped were then never
        committed: the group stayed behind for good. Records read again are
        processed again (at least once; the dedup agent counts them as
        redeliveries), and :meth:`_ack_batch` keeps overlapping batches from
        running the commit ahead.
        """
        delivered = self._delivered.get(tp)
        if delivered is not None and messages[0].offset <= delivered:
            logger.info(
                "transport: records fetched again delivered again: tp=%s again=%d",
                tp,
                sum(1 for message in messages if message.offset <= delivered),
            )

    def _batch_message(self, tp: TP, messages: list[Message]) -> Message:
        """Return the batch as one message, and register it as delivered."""
        last = messages[-1]
        # Acknowledging the batch acknowledges every offset it holds: see
        # _ack_batch (no gap is registered).
        # As if the record before the last had been delivered: the consumer
        # sees no gap of its own to register (it would hold the last offset
        # twice, and one commit would stop short of the end).
        self._read_offset[tp] = last.offset - 1
        self._delivered[tp] = last.offset
        batch = ConsumerMessage(
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
        self._live_batches.add(batch)
        return batch


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
