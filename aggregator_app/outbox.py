"""Records produced while one batch is processed, sent together.

Faust's ``Topic.send`` awaits each record's way into the producer, one record at
a time; at thousands of records per second that alone takes a core. An
:class:`Outbox` hands every record of a batch to the producer at once, and
:class:`InFlight` acknowledges the batch only once the broker has all of them,
so an offset is only committed once everything the batch produced is written
(at least once). A failed send never acknowledges its batch: the worker stops
rather than lose a record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aggregator_app.exceptions import AggregatorError

__all__ = ["Headers", "InFlight", "Outbox", "SendFailed"]

logger = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
OnSent = Callable[[Any], None]


class SendFailed(AggregatorError):
    """The broker did not take a record this worker produced."""


class Outbox:
    """Collects the sends of one batch; :meth:`flush` waits for all of them."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self._pending: list[Awaitable[Any]] = []
        self._on_sent: list[tuple[int, OnSent]] = []

    def __len__(self) -> int:
        return len(self._pending)

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
        on_sent: OnSent | None = None,
    ) -> None:
        """Hand one record to the producer; ``on_sent`` gets its metadata."""
        future = await self._producer.send(
            topic,
            key,
            value,
            partition,
            None if timestamp_ms is None else timestamp_ms / 1000,
            headers,
        )
        if on_sent is not None:
            self._on_sent.append((len(self._pending), on_sent))
        self._pending.append(future)

    async def flush(self) -> int:
        """Wait until the broker has every record; return how many there were.

        Raises:
            SendFailed: a record was refused or could not be delivered.
        """
        pending, on_sent = self._pending, self._on_sent
        self._pending, self._on_sent = [], []
        if not pending:
            return 0

        try:
            results = await asyncio.gather(*pending)
        except Exception as exc:
            raise SendFailed(f"a record was not delivered: {exc!r}") from exc

        for index, callback in on_sent:
            callback(results[index])
        return len(results)


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

    async def hand_over(self, outbox: Outbox, ack: Callable[[], object]) -> None:
        """Acknowledge with ``ack`` once every record of ``outbox`` is written."""
        await self._slots.acquire()
        task = asyncio.ensure_future(self._settle(outbox, ack))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, outbox: Outbox, ack: Callable[[], object]) -> None:
        try:
            await outbox.flush()
        except SendFailed as exc:
            logger.error("outbox: batch not acknowledged: error=%r", exc)
            await self._on_failure(exc)
            return
        finally:
            self._slots.release()
        ack()
