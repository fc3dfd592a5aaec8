"""The correlation agent: one global id per physical object of a site.

Deduplication sends every accepted event of a known site to
``<app>-correlation``, keyed by site id, so that all cameras of a site meet
this agent on one partition, beside the site's state in the correlation table.
For every fetched batch it:

1. hands the events to the :class:`~aggregator_app.correlate.Correlator`,
   which buffers them by event time and decides what the watermarks passed;
2. publishes, per decided event, its global id on ``<app>-assignments``
   (key: event id; value: ``{"event_id", "global_id", "site_id",
   "camera_id", "event_time_ms"}``); a ``correlated`` event, ``open`` or
   ``closed``, on ``aggregated-events`` for every global id made or closed;
   and every late event on the late-events topic, with how late it was;
3. writes the site's state to the table, its changelog record in the same
   batch of output; the batch is acknowledged once the broker has it all.

Every output record is keyed by what it is about (event id, aggregated id), so
a batch read again after a crash publishes the same records again, not new
ones: at-least-once, idempotent for a consumer that keeps the last value per
key. A timer moves the time of sites whose cameras went quiet.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from faust.types import Message, StreamT
from pydantic import ValidationError

from agents.dedup import in_flight, manual_acks, timed_ack
from agents.episodes import fuse_batch, fuser
from aggregator_app import sink
from aggregator_app.app import app, rules
from aggregator_app.correlate import Correlator, LateEvent, Step, Track
from aggregator_app.metrics import counters, latency
from aggregator_app.outbox import Outbox
from aggregator_app.schema import CorrelatedEvent, DetectorEvent, GroundPoint
from aggregator_app.topics import (
    TICK_HEADER,
    aggregated_topic,
    assignments_topic,
    correlation_topic,
    has_header,
    late_events_topic,
    partition_for_site,
)
from tables.correlation import TableSiteStore

__all__ = ["correlate_agent", "correlated_event", "correlator", "send_to_correlation"]

logger = logging.getLogger(__name__)

_rule = rules.correlation
correlator = Correlator(_rule)
_site_store = TableSiteStore()


async def send_to_correlation(event: DetectorEvent, outbox: Outbox) -> None:
    """Send an accepted event of a known site to the correlation topic."""
    if not _rule.enabled or event.site_id is None:
        return
    await outbox.send(
        correlation_topic.get_topic_name(),
        key=event.site_id.encode(),
        value=event.json_text.encode(),
        partition=partition_for_site(event.site_id),
        timestamp_ms=event.event_time_ms,
    )


@app.agent(correlation_topic, name="correlate")
async def correlate_agent(stream: StreamT) -> None:
    """Correlate a batch of one partition; publish what was decided."""
    async for event in manual_acks(stream).events():
        started_s = time.perf_counter()
        messages: list[Message] = event.value
        partition = event.message.partition
        outbox = Outbox(app.producer)
        events, ticked = _read(messages)
        now_s = time.monotonic()
        step = correlator.add(events, now_s=now_s)
        if ticked:
            for site_id in _sites_of(partition):
                step.extend(correlator.advance(site_id, now_s=now_s))
        await _publish(step, outbox)
        await _fuse(step, partition, outbox)
        if events or _decided_anything(step):
            await _save(partition, outbox)
        latency.observe("correlate", time.perf_counter() - started_s, len(messages))
        await in_flight.hand_over(
            outbox, timed_ack(event, "correlate_to_publish", started_s, len(messages))
        )


def _read(messages: Sequence[Message]) -> tuple[list[DetectorEvent], bool]:
    events: list[DetectorEvent] = []
    ticked = False
    for message in messages:
        if has_header(message, TICK_HEADER):
            ticked = True
            continue
        try:
            events.append(DetectorEvent.model_validate_json(message.value or b""))
        except ValidationError as exc:
            logger.error(
                "correlate: skipped invalid internal record: offset=%d error=%s",
                message.offset,
                exc,
            )
    return events, ticked


async def _fuse(step: Step, partition: int, outbox: Outbox) -> None:
    """Hand the batch's decided events to temporal fusion (episodes).

    Fusion runs here, on the site's partition: every global id of a site is
    made on it, and the episode panes are co-partitioned with it. The
    sites' watermarks go with the events, so that episodes close by event
    time.
    """
    pairs = [
        (assignment.global_id, assignment.event)
        for assignment in step.assignments
        if assignment.event is not None
    ]
    watermarks_ms = {
        site_id: correlator.watermark_ms(site_id) for site_id in _sites_of(partition)
    }
    await fuse_batch(
        pairs, partition=partition, outbox=outbox, site_watermarks_ms=watermarks_ms
    )


def _decided_anything(step: Step) -> bool:
    """Return whether a tick changed any state worth writing to the table."""
    return bool(step.assignments or step.opened or step.closed or step.late)


def _sites_of(partition: int) -> list[str]:
    return [site for site in correlator.sites if partition_for_site(site) == partition]


async def _publish(step: Step, outbox: Outbox) -> None:
    for assignment in step.assignments:
        value = json.dumps(
            {
                "event_id": assignment.event_id,
                "global_id": assignment.global_id,
                "site_id": assignment.site_id,
                "camera_id": assignment.camera_id,
                "event_time_ms": assignment.event_time_ms,
            }
        )
        await outbox.send(
            assignments_topic.get_topic_name(),
            key=assignment.event_id.encode(),
            value=value.encode(),
            partition_key=assignment.site_id.encode(),
            timestamp_ms=assignment.event_time_ms,
        )
    for track in step.opened:
        await _publish_track(track, "open", outbox)
    for track in step.closed:
        await _publish_track(track, "closed", outbox)
    for late in step.late:
        await _publish_late(late, outbox)
    counters.correlated_open += len(step.opened)
    counters.correlated_closed += len(step.closed)
    counters.correlation_late += len(step.late)


def correlated_event(track: Track, status: str) -> CorrelatedEvent:
    """Return the published form of a track: ``open`` as made, or ``closed``."""
    position = track.last_position
    return CorrelatedEvent(
        aggregated_id=f"{_rule.rule_id}:{track.global_id}:{status}",
        type="correlated",
        status=status,  # type: ignore[arg-type]  # "open" or "closed", by the callers
        rule_id=_rule.rule_id,
        global_id=track.global_id,
        site_id=track.site_id,
        cameras=list(track.all_cameras),
        first_seen_ms=track.first_ms,
        last_seen_ms=track.last_ms,
        member_count=track.member_count,
        member_ids=list(track.member_ids),
        last_position=None
        if position is None
        else GroundPoint(x_m=position[0], y_m=position[1]),
        merged_into=track.merged_into,
    )


async def _publish_track(track: Track, status: str, outbox: Outbox) -> None:
    """Publish a global id as it is when made (``open``) or closed.

    An ``open`` event is sent when the global id is made, with its first
    member only; published again after a restart, it is the same record.
    """
    published = correlated_event(track, status)
    await outbox.send(
        aggregated_topic.get_topic_name(),
        key=published.aggregated_id.encode(),
        value=published.json_text.encode(),
        partition_key=track.site_id.encode(),
        timestamp_ms=track.first_ms,
    )
    sink.correlated_event(published)


async def _publish_late(late: LateEvent, outbox: Outbox) -> None:
    """Publish a late event; the correlator has counted it (``late_count``).

    TODO: the count is logged here, not exported with the other counters;
    add it to :mod:`aggregator_app.metrics` when the web page shows it.
    """
    logger.info(
        "correlate: late event: event_id=%s camera_id=%s late_by_ms=%d late_count=%d",
        late.event.event_id,
        late.event.camera_id,
        late.late_by_ms,
        correlator.late_count,
    )
    await outbox.send(
        late_events_topic.get_topic_name(),
        key=late.event.event_id.encode(),
        value=late.event.json_text.encode(),
        partition_key=(late.event.site_id or "").encode(),
        timestamp_ms=late.event.event_time_ms,
        headers=[
            ("late-by-ms", str(late.late_by_ms).encode()),
            ("watermark-ms", str(late.watermark_ms).encode()),
        ],
    )


async def _save(partition: int, outbox: Outbox) -> None:
    for site_id in _sites_of(partition):
        _site_store.put(correlator.site(site_id))
    await _site_store.send_changelog(partition, outbox)


@app.timer(interval=1.0)
async def _tick_quiet_sites() -> None:
    """Ask the partitions of sites with undecided events, open tracks or open
    episodes to move on.

    A tick record goes through the partition like any record, so the state
    changes it causes are made inside the agent, beside the table.
    """
    topic_name = correlation_topic.get_topic_name()
    assigned = {
        tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic_name
    }
    for site_id, state in correlator.sites.items():
        partition = partition_for_site(site_id)
        busy = (
            state.pending
            or any(not t.closed for t in state.tracks.values())
            or fuser.has_open(site_id)
        )
        if partition in assigned and busy:
            await app.producer.send(
                topic_name, None, b"", partition, None, [(TICK_HEADER, b"1")]
            )


@_site_store.table.on_recover
async def _on_recovered() -> None:
    """Take back every site state this worker holds, after a rebalance."""
    now_s = time.monotonic()
    sites = 0
    for state in _site_store.states():
        correlator.load(state, now_s=now_s)
        sites += 1
    logger.info("correlate: site states restored: sites=%d", sites)


@app.on_partitions_revoked.connect  # type: ignore[arg-type]  # stub wants a positional-only sender
async def _on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
    correlator.sites.clear()
    _site_store.forget()
    logger.info("correlate: partitions revoked, site states cleared")
