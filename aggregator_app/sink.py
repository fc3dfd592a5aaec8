"""Where processed events go besides Kafka: the event store, through its writer.

The agents call these functions on the event loop; they only hand rows to the
writer's bounded buffer (:class:`~aggregator_app.store.StoreWriter`), which
writes them in batches from its own thread. The writer is opened on first use,
so that no row is missed while the worker starts, and stopped with the worker
(what is left is written, or spooled to disk for the next start).

No row of a committed event is lost, even to SIGKILL: before faust commits
offsets it flushes its producer, and :func:`install_commit_barrier` makes
that flush also wait until every row submitted so far is stored or spooled
(at most ``AGGREGATOR_STORE_COMMIT_WAIT_MS``, then the rest is spooled). An
agent must therefore hand over an event's rows before it takes the next
record, as the agents do now.

Retention: every ``AGGREGATOR_RETENTION_INTERVAL_S`` the group's leader drops
the days stored more than ``AGGREGATOR_RETENTION_DAYS`` ago
(``EventStore.drop_partitions_older_than``); on servers with TTL the tables
expire rows by themselves too. Running it on several workers at once is
harmless.

TODO: with ``exactly_once`` faust commits through the transaction and does not
flush the producer first, so the barrier does not run there; the mark goes
when the transaction path calls it too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mode import Service

from aggregator_app.app import app, settings
from aggregator_app.dedup import Decision
from aggregator_app.exceptions import StoreError
from aggregator_app.metrics import latency
from aggregator_app.schema import (
    ActionEvent,
    AggregatedEvent,
    CorrelatedEvent,
    DetectorEvent,
    EpisodeEvent,
)
from aggregator_app.store import (
    EventStore,
    Outcome,
    StoreWriter,
    action_event_row,
    aggregated_event_row,
    correlated_event_row,
    detector_event_row,
    episode_event_row,
    open_store,
)

__all__ = [
    "action_event",
    "aggregated_event",
    "aggregated_events",
    "correlated_event",
    "backlog_rows",
    "before_commit",
    "detector_event",
    "detector_events",
    "drop_expired",
    "episode_event",
    "install_commit_barrier",
    "last_error",
    "store",
    "stored_counts",
    "writer",
    "writer_stats",
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
            writer = StoreWriter(
                store,
                spool_dir=settings.data_dir / "spool",
                flush_interval_ms=settings.store_flush_ms,
            )
            writer.on_batch = _observe_batch
            writer.start()
            _state.update(store=store, writer=writer)
            logger.info(
                "store: writer started: url=%s", settings.clickhouse_url or "embedded"
            )
        return _state["writer"]


def _observe_batch(table: str, rows: int, seconds: float) -> None:
    latency.observe("store_write", seconds)


def writer() -> StoreWriter:
    """Return the store writer, opening it on first use."""
    current = _state["writer"]
    return current if current is not None else _open()


def store() -> EventStore:
    """Return the event store the writer writes to (opening both on first use)."""
    writer()
    opened: EventStore = _state["store"]
    return opened


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


def aggregated_events(events: Sequence[AggregatedEvent]) -> None:
    """Record the aggregated events a batch published, in one submission."""
    if not events:
        return
    inserted_at_ms = int(time.time() * 1000)
    writer().submit_aggregated(
        [aggregated_event_row(event, inserted_at_ms=inserted_at_ms) for event in events]
    )


def correlated_event(event: CorrelatedEvent) -> None:
    """Record a published ``correlated`` event (in ``aggregated_events``)."""
    row = correlated_event_row(event, inserted_at_ms=int(time.time() * 1000))
    writer().submit_aggregated([row])


def action_event(event: ActionEvent) -> None:
    """Record a published action event (in ``aggregated_events``)."""
    row = action_event_row(event, inserted_at_ms=int(time.time() * 1000))
    writer().submit_aggregated([row])


def episode_event(event: EpisodeEvent) -> None:
    """Record a published episode (in ``aggregated_events``)."""
    row = episode_event_row(event, inserted_at_ms=int(time.time() * 1000))
    writer().submit_aggregated([row])


def backlog_rows() -> int:
    """Return the rows handed to the writer and not stored yet."""
    current = _state["writer"]
    return 0 if current is None else current.backlog_rows


def last_error() -> str | None:
    """Return the store writer's last failure, ``None`` once it writes again."""
    current = _state["writer"]
    return None if current is None else current.last_error


def writer_stats() -> dict[str, int]:
    """Return the writer's row counters (zeros before it is opened)."""
    current = _state["writer"]
    if current is None:
        return dict.fromkeys(_WRITER_STATS, 0)
    return {name: int(getattr(current, name)) for name in _WRITER_STATS}


_WRITER_STATS = (
    "rows_submitted",
    "rows_durable",
    "rows_written",
    "rows_spooled",
    "rows_failed",
)


def stored_counts() -> dict[str, int]:
    """Return the rows in the store (blocking: call it from a thread)."""
    opened = store()
    return {
        "detector_events": opened.count_detector_events(),
        "aggregated_events": opened.count_aggregated_events(),
    }


async def before_commit() -> None:
    """Make every row submitted so far durable; offsets are committed next.

    1. Note the rows submitted up to now (the mark); later rows are not waited for.
    2. Wait for the writer to store them, at most the commit wait.
    3. Spool what is still in memory, so that a SIGKILL right after the
       commit loses nothing.
    """
    # Step 1.
    current = _state["writer"]
    if current is None:
        return
    mark = current.submitted_mark()
    if current.is_durable(mark):
        return

    # Step 2.
    started_s = time.perf_counter()
    wait_s = settings.store_commit_wait_ms / 1000
    stored = await asyncio.to_thread(current.wait_durable, mark, wait_s)

    # Step 3.
    if not stored:
        try:
            spooled = await asyncio.to_thread(current.spool_through, mark)
        except StoreError as exc:
            # Nothing more can be done here; the commit goes on, as before.
            logger.error("store: rows of committed events not durable: error=%s", exc)
        else:
            logger.warning(
                "store: commit waited in vain, rows spooled: rows=%d wait_s=%.1f",
                spooled,
                wait_s,
            )
    latency.observe("commit_wait", time.perf_counter() - started_s)


def install_commit_barrier(
    producer: Any, barrier: Callable[[], Awaitable[None]] = before_commit
) -> None:
    """Make ``producer.flush`` (called before every offset commit) run ``barrier``.

    faust's consumer flushes the app's producer right before it commits
    offsets (``Consumer._commit_offsets``), and when partitions are revoked;
    it has no hook of its own there, so the flush is wrapped, once.
    """
    flush = producer.flush
    if getattr(flush, "_commit_barrier", False):
        return

    async def flush_then_barrier() -> None:
        await flush()
        await barrier()

    flush_then_barrier._commit_barrier = True  # type: ignore[attr-defined]  # marker
    producer.flush = flush_then_barrier
    logger.info("store: commit barrier installed on the producer flush")


def drop_expired() -> int:
    """Drop the days stored before the retention; blocking, call from a thread."""
    return store().drop_partitions_older_than(settings.retention_days)


@app.timer(interval=float(settings.retention_interval_s), on_leader=True)
async def _retention() -> None:
    try:
        dropped = await asyncio.to_thread(drop_expired)
    except StoreError as exc:
        logger.warning("store: retention failed, next run retries: error=%s", exc)
        return
    logger.info(
        "store: retention ran: days=%d partitions_dropped=%d",
        settings.retention_days,
        dropped,
    )


@app.service
class StoreSink(Service):
    """Opens the store writer with the worker, and stops it with the worker."""

    async def on_start(self) -> None:
        install_commit_barrier(app.producer)
        await asyncio.to_thread(writer)

    async def on_stop(self) -> None:
        current = _state["writer"]
        if current is not None:
            await asyncio.to_thread(current.stop, 10.0)
