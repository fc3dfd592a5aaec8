"""The dedup agent: keeps one event per repeated thing and publishes it.

It reads ``detector-events`` (keyed by camera id, so every dedup key of a
camera meets this agent on one partition) and, for every event:

1. decides kept / repeat / redelivery (:class:`~aggregator_app.dedup.Deduplicator`);
2. writes the changed window to the dedup table at once, in the event's
   partition;
3. publishes a kept event at once as an ``open`` observation (again, with the
   same id, when it is read again after a restart);
4. now and then, closes the spans that the partition's watermark has passed
   and publishes them as ``closed`` observations with what they absorbed, and
   forgets the windows that no event can reach any more.

A tick record (header :data:`~aggregator_app.topics.TICK_HEADER`) carries no
event: it closes the spans of a partition that has gone quiet.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from faust.types import StreamT
from pydantic import ValidationError

from aggregator_app import sink
from aggregator_app.app import app, rules
from aggregator_app.dedup import Decision, Deduplicator, Span
from aggregator_app.metrics import counters
from aggregator_app.schema import AggregatedEvent, DetectorEvent
from aggregator_app.topics import (
    TICK_HEADER,
    aggregated_topic,
    detector_events_topic,
    has_header,
)
from tables.dedup import TableSpanStore, dedup_table

__all__ = ["dedup_agent", "deduplicate", "deduplicator"]

logger = logging.getLogger(__name__)

_CLOSE_EVERY_S = 0.2
_rule = rules.dedup
_window_ms = int(_rule.window_s * 1000)
_horizon_ms = 2 * _window_ms + int(_rule.grace_s * 1000)

_span_store = TableSpanStore()
deduplicator = Deduplicator(_rule, _span_store)
_last_close_s: dict[int, float] = {}
_last_event_s: dict[int, float] = {}


@app.agent(detector_events_topic, name="dedup")
async def dedup_agent(stream: StreamT) -> None:
    """Deduplicate detector events and publish observations."""
    async for event in stream.events():
        message = event.message
        if has_header(event, TICK_HEADER):
            await _maybe_close(message.partition, force=True)
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
        await deduplicate(
            detector_event,
            partition=message.partition,
            position=f"{message.topic}/{message.partition}/{message.offset}",
        )


async def deduplicate(
    detector_event: DetectorEvent, *, partition: int, position: str
) -> None:
    """Deduplicate one event of the partition being processed, and publish.

    Must run inside the iteration of an agent whose current record is in
    ``partition`` of a topic co-partitioned with the dedup table: the ingest
    agents call it directly for records already keyed by camera id.
    """
    _last_event_s[partition] = time.monotonic()
    watermark_ms = deduplicator.watermark_ms(partition)
    if (
        watermark_ms is not None
        and detector_event.event_time_ms < watermark_ms - _horizon_ms
    ):
        counters.late += 1

    decision = deduplicator.observe(detector_event, partition, position)
    _count(decision)
    # Every change is written at once, in this event's partition: a graceful
    # stop commits the offset of this event, so nothing would write it later.
    deduplicator.flush(partition)
    if decision.outcome in ("kept", "reprocessed"):
        await _publish(detector_event, decision.span, status="open")
    sink.detector_event(detector_event, decision)
    await _maybe_close(partition, force=False)


def _count(decision: Decision) -> None:
    if decision.outcome == "kept":
        counters.kept += 1
    elif decision.outcome == "repeat":
        counters.repeats += 1
    elif decision.outcome == "redelivery":
        counters.redeliveries += 1
    else:
        counters.reprocessed += 1


async def _maybe_close(partition: int, *, force: bool) -> None:
    now_s = time.monotonic()
    if not force and now_s - _last_close_s.get(partition, 0.0) < _CLOSE_EVERY_S:
        return
    _last_close_s[partition] = now_s

    idle_s = now_s - _last_event_s.get(partition, now_s)
    idle = force and idle_s >= _rule.close_after_idle_s
    closed = deduplicator.close_due(partitions=[partition], force=idle)
    for _key, span in closed:
        await _publish_closed(span)
    deduplicator.flush(partition)

    watermark_ms = deduplicator.watermark_ms(partition)
    if watermark_ms is not None:
        deduplicator.forget_before(partition, watermark_ms - _horizon_ms)


async def _publish_closed(span: Span) -> None:
    kept = DetectorEvent.model_validate_json(span.kept_json)
    await _publish(kept, span, status="closed")


async def _publish(event: DetectorEvent, span: Span, *, status: str) -> None:
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
    await aggregated_topic.send(
        key=aggregated.aggregated_id.encode(),
        value=aggregated.model_dump_json().encode(),
        timestamp=span.start_ms / 1000,
    )
    if is_open:
        counters.published_open += 1
    else:
        counters.published_closed += 1
    sink.aggregated_event(aggregated)


@app.timer(interval=1.0)
async def _tick_idle_partitions() -> None:
    """Ask every quiet partition with open spans to close them."""
    now_s = time.monotonic()
    topic_name = detector_events_topic.get_topic_name()
    for tp in app.assignor.assigned_actives():
        if tp.topic != topic_name or not deduplicator.has_open(tp.partition):
            continue
        if now_s - _last_event_s.get(tp.partition, now_s) < _rule.close_after_idle_s:
            continue
        await detector_events_topic.send(
            value=b"", partition=tp.partition, headers=[(TICK_HEADER, b"1")]
        )


@dedup_table.table.on_recover
async def _on_recovered() -> None:
    """Track again the spans this worker holds, so that open ones still close.

    Runs after every rebalance, once the table is restored from its changelog.
    A partition counts as quiet from now on: with no event for
    ``close_after_idle_s``, its open spans close by the idle tick.
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
    logger.info("dedup: partitions revoked, span cache cleared")
