"""Where processed events go besides Kafka: the event store, through its writer.

The agents call these functions on the event loop; they only hand rows to the
writer's bounded buffer (:class:`~aggregator_app.store.StoreWriter`), which
writes them in batches from its own thread. The writer is opened on first use,
so that no row is missed while the worker starts, and stopped with the worker
(what is left is written, or spooled to disk for the next start).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from mode import Service

from aggregator_app.app import app, settings
from aggregator_app.dedup import Decision
from aggregator_app.schema import AggregatedEvent, DetectorEvent
from aggregator_app.store import (
    EventStore,
    Outcome,
    StoreWriter,
    aggregated_event_row,
    detector_event_row,
    open_store,
)

__all__ = [
    "aggregated_event",
    "backlog_rows",
    "detector_event",
    "detector_events",
    "last_error",
    "stored_counts",
    "writer",
]

logger = logging.getLogger(__name__)

_OUTCOMES = {
    "kept": Outcome.KEPT,
    "reprocessed": Outcome.KEPT,
    "repeat": Outcome.REPEAT,
    "redelivery": Outcome.REDELIVERY,
}
_lock = threading.Lock()
_state: dict[str, Any] = {"store": None, "writer": None}


def _open() -> StoreWriter:
    with _lock:
        if _state["writer"] is None:
            store = open_store(
                settings.clickhouse_url, default_dir=settings.data_dir / "chdb"
            )
            writer = StoreWriter(store, spool_dir=settings.data_dir / "spool")
            writer.start()
            _state.update(store=store, writer=writer)
            logger.info(
                "store: writer started: url=%s", settings.clickhouse_url or "embedded"
            )
        return _state["writer"]


def writer() -> StoreWriter:
    """Return the store writer, opening it on first use."""
    current = _state["writer"]
    return current if current is not None else _open()


def detector_event(event: DetectorEvent, decision: Decision) -> None:
    """Record an accepted detector event with its dedup outcome."""
    row = detector_event_row(
        event,
        outcome=_OUTCOMES[decision.outcome],
        kept_event_id=decision.span.kept_id,
        inserted_at_ms=int(time.time() * 1000),
    )
    writer().submit_detector([row])


def detector_events(decisions: Sequence[tuple[DetectorEvent, Decision]]) -> None:
    """Record the accepted detector events of a batch with their dedup outcomes."""
    if not decisions:
        return
    inserted_at_ms = int(time.time() * 1000)
    rows = [
        detector_event_row(
            event,
            outcome=_OUTCOMES[decision.outcome],
            kept_event_id=decision.span.kept_id,
            inserted_at_ms=inserted_at_ms,
        )
        for event, decision in decisions
    ]
    writer().submit_detector(rows)


def aggregated_event(event: AggregatedEvent) -> None:
    """Record a published aggregated event."""
    row = aggregated_event_row(event, inserted_at_ms=int(time.time() * 1000))
    writer().submit_aggregated([row])


def backlog_rows() -> int:
    """Return the rows handed to the writer and not stored yet."""
    current = _state["writer"]
    return 0 if current is None else current.backlog_rows


def last_error() -> str | None:
    """Return the store writer's last failure, ``None`` once it writes again."""
    current = _state["writer"]
    return None if current is None else current.last_error


def stored_counts() -> dict[str, int]:
    """Return the rows in the store (blocking: call it from a thread)."""
    writer()
    store: EventStore = _state["store"]
    return {
        "detector_events": store.count_detector_events(),
        "aggregated_events": store.count_aggregated_events(),
    }


@app.service
class StoreSink(Service):
    """Opens the store writer with the worker, and stops it with the worker."""

    async def on_start(self) -> None:
        await asyncio.to_thread(writer)

    async def on_stop(self) -> None:
        current = _state["writer"]
        if current is not None:
            await asyncio.to_thread(current.stop, 10.0)
