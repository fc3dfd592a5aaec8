"""The dedup agent: keeps one event per repeated thing and publishes it.

It reads ``detector-events`` (keyed by camera id, so every dedup key of a
camera meets this agent on one partition) a fetched batch at a time
(:mod:`aggregator_app.transport`), and for every batch:

1. decides, event by event, kept / repeat / redelivery
   (:class:`~aggregator_app.dedup.Deduplicator`);
2. writes the windows the batch changed to the dedup table, in the batch's
   partition, once each;
3. publishes every kept event as an ``open`` observation (again, with the same
   id, when it is read again after a restart);
4. closes the spans that the partition's watermark has passed and publishes
   them as ``closed`` observations with what they absorbed, and forgets the
   windows that no event can reach any more;
5. hands the batch's records over and goes on with the next batch; the
   batch is acknowledged, and its offsets may be committed, once the broker
   has every record it produced.

A tick record (header :data:`~aggregator_app.topics.TICK_HEADER`) carries no
event: it closes the spans of a partition that has gone quiet.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from faust import Stream
from faust.types import EventT, Message, StreamT
from pydantic import ValidationError

from agents.actions import act_on_batch, matcher
from aggregator_app import sink
from aggregator_app.app import app, rules
from aggregator_app.dedup import Decision, Deduplicator, Span
from aggregator_app.metrics import counters, latency
from aggregator_app.outbox import InFlight, Outbox
from aggregator_app.schema import AggregatedEvent, DetectorEvent
from aggregator_app.topics import (
    TICK_HEADER,
    aggregated_topic,
    detector_events_topic,
    has_header,
)
from tables.dedup import TableSpanStore


async def send_to_correlation(event: DetectorEvent, outbox: Outbox) -> None:
    """Hand an accepted event to correlation (``agents.correlate``)."""
    from agents.correlate import send_to_correlation as send

    await send(event, outbox)


__all__ = [
    "dedup_agent",
    "deduplicate_batch",
    "deduplicator",
    "in_flight",
    "manual_acks",
    "timed_ack",
]

logger = logging.getLogger(__name__)

#: A position: where an event was read ("topic/partition/offset[/index]").
Positioned = tuple[DetectorEvent, str]

_rule = rules.dedup
_window_ms = int(_rule.window_s * 1000)
_horizon_ms = 2 * _window_ms + int(_rule.grace_s * 1000)
_max_age_s = rules.ingest.max_clock_skew_s

_span_store = TableSpanStore()
deduplicator = Deduplicator(_rule, _span_store, read_through=False)
_last_event_s: dict[int, float] = {}
#: Observations published by the batch being handled, stored at its end.
_published: list[AggregatedEvent] = []
#: Per partition: (wall-clock time, horizon then), oldest first.
_horizons: dict[int, deque[tuple[float, int]]] = {}
#: How long a reached horizon waits before windows behind it are forgotten:
#: many commit intervals (``broker_commit_interval`` in the app).
_FORGET_DELAY_S = 10.0
_HORIZON_STEP_S = 0.5
_IN_FLIGHT_BATCHES = 32


def manual_acks(stream: StreamT) -> StreamT:
    """Return the stream with acknowledgements left to the agent."""
    return cast(Stream, stream).noack()


async def _stop_worker(exc: BaseException) -> None:
    await app.crash(exc)


#: Batches of every agent whose records are on their way to the broker.
in_flight = InFlight(limit=_IN_FLIGHT_BATCHES, on_failure=_stop_worker)


@app.agent(detector_events_topic, name="dedup")
async def dedup_agent(stream: StreamT) -> None:
    """Deduplicate detector events and publish observations, a batch at a time.

    A batch is acknowledged once the broker has what it produced
    (:class:`~aggregator_app.outbox.InFlight`), not when the loop moves on.
    """
    async for event in manual_acks(stream).events():
        started_s = time.perf_counter()
        messages: list[Message] = event.value
        partition = event.message.partition
        outbox = Outbox(app.producer)
        events, ticked = _read_internal(messages)
        await deduplicate_batch(events, partition=partition, outbox=outbox)
        if ticked:
            await _close_due(partition, outbox, force=True)
        latency.observe("dedup", time.perf_counter() - started_s, len(messages))
        await in_flight.hand_over(
            outbox, timed_ack(event, "dedup_to_publish", started_s, len(messages))
        )


def timed_ack(
    event: EventT, stage: str, started_s: float, records: int
) -> Callable[[], None]:
    """Return the acknowledgement of a batch that also times it, in ``stage``."""

    def ack() -> None:
        latency.observe(stage, time.perf_counter() - started_s, records)
        event.ack()

    return ack


def _read_internal(messages: Sequence[Message]) -> tuple[list[Positioned], bool]:
    """Return the events of a batch of ``detector-events``, and whether it ticked."""
    events: list[Positioned] = []
    ticked = False
    for message in messages:
        if has_header(message, TICK_HEADER):
            ticked = True
            continue
        try:
            detector_event = DetectorEvent.model_validate_json(message.value or b"")
        except ValidationError as exc:
            # Only this service writes the topic: a bad record is a bug, not input.
            logger.error(
                "dedup: skipped invalid internal record: offset=%d error=%s",
                message.offset,
                exc,
            )
            continue
        position = f"{message.topic}/{message.partition}/{message.offset}"
        events.append((detector_event, position))
    return events, ticked


async def deduplicate_batch(
    events: Sequence[Positioned], *, partition: int, outbox: Outbox
) -> None:
    """Deduplicate the events of one batch of ``partition``, and publish.

    Must run inside the iteration of an agent whose current record is a batch
    of ``partition`` of a topic co-partitioned with the dedup table: the
    ingest agents call it directly for records already keyed by camera id.
    The records it produces are in ``outbox``; the caller flushes it.
    """
    if events:
        _last_event_s[partition] = time.monotonic()

    latest_ms = int((time.time() + _rule.watermark_max_lead_s) * 1000)
    decisions: list[tuple[DetectorEvent, Decision]] = []
    for detector_event, position in events:
        decision = _observe(detector_event, partition, position, latest_ms)
        decisions.append((detector_event, decision))
        await send_to_correlation(detector_event, outbox)
        if decision.outcome in ("kept", "reprocessed"):
            await _publish(detector_event, decision.span, "open", outbox)

    sink.detector_events(decisions)
    await _close_due(partition, outbox, force=False)
    await act_on_batch(events, partition=partition, outbox=outbox)


def _observe(
    event: DetectorEvent, partition: int, position: str, latest_ms: int
) -> Decision:
    watermark_ms = deduplicator.watermark_ms(partition)
    if watermark_ms is not None and event.event_time_ms < watermark_ms - _horizon_ms:
        counters.late += 1

    decision = deduplicator.observe(event, partition, position, latest_ms=latest_ms)
    _count(decision)
    return decision


def _count(decision: Decision) -> None:
    if decision.outcome == "kept":
        counters.kept += 1
    elif decision.outcome == "repeat":
        counters.repeats += 1
    elif decision.outcome == "redelivery":
        counters.redeliveries += 1
    else:
        counters.reprocessed += 1


async def _close_due(partition: int, outbox: Outbox, *, force: bool) -> None:
    """Close due spans, forget old windows, write the table's changes.

    ``force`` (a tick) closes every open span of a partition that has had no
    event for ``close_after_idle_s``.
    """
    now_s = time.monotonic()
    idle_s = now_s - _last_event_s.get(partition, now_s)
    idle = force and idle_s >= _rule.close_after_idle_s
    for _key, span in deduplicator.close_due(partitions=[partition], force=idle):
        await _publish_closed(span, outbox)
    deduplicator.flush(partition)

    _forget_old_windows(partition, now_s)
    await _span_store.send_changelog(partition, outbox)
    sink.aggregated_events(_published)
    _published.clear()


def _forget_old_windows(partition: int, now_s: float) -> None:
    """Forget the windows no event can reach any more, once that is safe.

    A window is out of reach once the watermark is ``_horizon_ms`` past it,
    but the records that were processed before then may not be committed
    yet; after a crash they are read again and must find their spans. So a
    horizon takes effect only ``_FORGET_DELAY_S`` of wall-clock time after
    it was reached, many commit intervals later.
    """
    watermark_ms = deduplicator.watermark_ms(partition)
    horizons = _horizons.setdefault(partition, deque())
    if watermark_ms is not None and (
        not horizons or now_s - horizons[-1][0] >= _HORIZON_STEP_S
    ):
        horizons.append((now_s, watermark_ms - _horizon_ms))

    safe_ms = None
    while horizons and horizons[0][0] <= now_s - _FORGET_DELAY_S:
        safe_ms = horizons.popleft()[1]
    if safe_ms is not None:
        deduplicator.forget_before(partition, safe_ms)


async def _publish_closed(span: Span, outbox: Outbox) -> None:
    kept = DetectorEvent.model_validate_json(span.kept_json)
    await _publish(kept, span, "closed", outbox)


async def _publish(
    event: DetectorEvent, span: Span, status: str, outbox: Outbox
) -> None:
    """Publish an observation: ``open`` as it was when kept, or ``closed``.

    An ``open`` observation carries nothing absorbed, even when it is published
    again after a restart and the span has absorbed events since: published
    twice, it is the same record twice.
    """
    is_open = status == "open"
    aggregated = AggregatedEvent(
        aggregated_id=f"{_rule.rule_id}:{event.event_id}",
        type="observation",
        status=status,  # type: ignore[arg-type]  # "open" or "closed", by the callers
        rule_id=_rule.rule_id,
        camera_id=event.camera_id,
        site_id=event.site_id,
        detector=event.detector,
        label=event.label,
        start_time_ms=span.start_ms,
        end_time_ms=span.start_ms if is_open else span.last_ms,
        absorbed_count=0 if is_open else span.absorbed_count,
        absorbed_ids=[] if is_open else list(span.absorbed_ids),
        event=event,
    )
    await outbox.send(
        aggregated_topic.get_topic_name(),
        key=aggregated.aggregated_id.encode(),
        value=aggregated.json_text.encode(),
        partition_key=event.camera_id.encode(),
        timestamp_ms=span.start_ms,
    )
    if is_open:
        counters.published_open += 1
        _observe_event_age(event)
    else:
        counters.published_closed += 1
    _published.append(aggregated)


def _observe_event_age(event: DetectorEvent) -> None:
    """Time from the detector's event time to its observation's publication.

    The whole path from the camera, across every hop, by the detector's
    clock. Recorded data (older than the allowed clock skew) and clocks
    ahead of ours say nothing about the path, and are left out.
    """
    age_s = time.time() - event.event_time_ms / 1000
    if 0.0 <= age_s <= _max_age_s:
        latency.observe("event_to_publish", age_s)


@app.timer(interval=1.0)
async def _tick_idle_partitions() -> None:
    """Ask every quiet partition with open spans to close them."""
    now_s = time.monotonic()
    topic_name = detector_events_topic.get_topic_name()
    for tp in app.assignor.assigned_actives():
        waiting = deduplicator.has_open(tp.partition) or matcher.has_pending(
            tp.partition
        )
        if tp.topic != topic_name or not waiting:
            continue
        if now_s - _last_event_s.get(tp.partition, now_s) < _rule.close_after_idle_s:
            continue
        await app.producer.send(
            topic_name, None, b"", tp.partition, None, [(TICK_HEADER, b"1")]
        )


@_span_store.table.on_recover
async def _on_recovered() -> None:
    """Track again the spans this worker holds, so that open ones still close.

    Runs after every rebalance, once the table is restored from its changelog,
    before any record is processed: the deduplicator then holds every stored
    window (it reads no store on a cache miss). A partition counts as quiet
    from now on: with no event for ``close_after_idle_s``, its open spans
    close by the idle tick.
    """
    now_s = time.monotonic()
    windows = 0
    for window, spans in _span_store.windows():
        deduplicator.load(window, spans)
        if spans:
            _last_event_s.setdefault(spans[0].partition, now_s)
        windows += 1
    logger.info("dedup: spans restored: windows=%d", windows)


@app.on_partitions_revoked.connect  # type: ignore[arg-type]  # stub wants a positional-only sender
async def _on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
    deduplicator.reset()
    _horizons.clear()
    logger.info("dedup: partitions revoked, span cache cleared")


@app.on_before_shutdown.connect  # type: ignore[arg-type]  # stub wants a positional-only sender
async def _commit_at_shutdown(sender: Any, *args: Any, **kwargs: Any) -> None:
    """Commit what the streams finished before the worker stops.

    By now the streams are empty and every batch is acknowledged; committing
    here, while the consumer still runs, leaves nothing to read again after a
    graceful stop.
    """
    committed = await app.consumer.commit()
    logger.info("dedup: committed at shutdown: committed=%s", committed)
