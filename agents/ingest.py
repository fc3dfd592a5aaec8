"""One ingest agent per detector source declared in the rules file.

Each agent reads its topic's raw bytes a fetched batch of one partition at a
time (:mod:`aggregator_app.transport`), turns every message into unified
events (:func:`aggregator_app.ingest.parse_record`) and copies every rejected
message byte for byte to the dead-letter topic with the reason in its headers.
Nothing raises out of the loop: a worker never stops on bad input.

An accepted event goes on to deduplication. When its record already sits in
its camera's partition (the producer keyed it by camera id, as asked), it is
deduplicated here, at once: every topic has the same partition count, so the
dedup table's partition is this worker's too. Otherwise it is re-keyed to
``detector-events`` by camera id, with the event time as the record
timestamp, and the dedup agent takes it from there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from faust.types import Message, StreamT

from agents.dedup import (
    Positioned,
    deduplicate_batch,
    in_flight,
    manual_acks,
    timed_ack,
)
from aggregator_app.app import app, rules
from aggregator_app.exceptions import RejectedEvent
from aggregator_app.ingest import (
    REPLAY_HEADER,
    RawRecord,
    dead_letter_headers,
    parse_record,
)
from aggregator_app.metrics import counters, latency
from aggregator_app.outbox import Outbox
from aggregator_app.schema import DetectorEvent
from aggregator_app.topics import (
    dead_letter_topic,
    detector_events_topic,
    has_header,
    partition_for_camera,
    source_topic,
)
from rules.config import SourceConfig

__all__ = ["TRUNCATED_HEADER", "ingest_agents"]

logger = logging.getLogger(__name__)

#: Largest dead-letter value sent whole: under Kafka's default 1 MiB
#: ``max.message.bytes`` with room for the headers.
_DEAD_LETTER_MAX_BYTES = 900 * 1024

#: Header of a dead-letter copy cut to the payload limit: the original size.
TRUNCATED_HEADER = "dead-letter-truncated-from"

AgentFun = Callable[[StreamT], Coroutine[Any, Any, None]]


def _raw_record(message: Message) -> RawRecord:
    return RawRecord(
        value=message.value,
        key=message.key,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
        replayed=has_header(message, REPLAY_HEADER),
    )


async def ingest_batch(
    messages: Sequence[Message], source: SourceConfig, partition: int
) -> Outbox:
    """Parse, validate and route one fetched batch of a source partition.

    Returns what the batch produced (dead letters, re-keyed events,
    observations, table changes), handed to the producer; the batch may be
    acknowledged once the broker has all of it.
    """
    outbox = Outbox(app.producer)
    now_ms = int(time.time() * 1000)
    local: list[Positioned] = []
    for message in messages:
        record = _raw_record(message)
        for detector_event, position in await _accept(record, source, now_ms, outbox):
            if partition_for_camera(detector_event.camera_id) == partition:
                local.append((detector_event, position))
            else:
                await _rekey(detector_event, outbox)

    await deduplicate_batch(local, partition=partition, outbox=outbox)
    return outbox


async def _accept(
    record: RawRecord, source: SourceConfig, now_ms: int, outbox: Outbox
) -> list[Positioned]:
    """Return the events of one record, or dead-letter it and return none."""
    counters.received += 1
    try:
        detector_events = parse_record(
            record, source=source, rules=rules, now_ms=now_ms
        )
    except RejectedEvent as error:
        counters.reject(error.reason)
        await _dead_letter(record, error, outbox)
        return []

    counters.accepted_messages += 1
    counters.accepted_events += len(detector_events)
    prefix = f"{record.topic}/{record.partition}/{record.offset}"
    return [(event, f"{prefix}/{index}") for index, event in enumerate(detector_events)]


async def _rekey(detector_event: DetectorEvent, outbox: Outbox) -> None:
    """Send an event to ``detector-events``, keyed by camera, for the dedup agent."""
    await outbox.send(
        detector_events_topic.get_topic_name(),
        key=detector_event.camera_id.encode(),
        value=detector_event.json_text.encode(),
        partition=partition_for_camera(detector_event.camera_id),
        timestamp_ms=detector_event.event_time_ms,
    )


async def _dead_letter(record: RawRecord, error: RejectedEvent, outbox: Outbox) -> None:
    """Copy a rejected record to the dead-letter topic, byte for byte.

    A value the broker would refuse (over ``_DEAD_LETTER_MAX_BYTES``; a send
    over the broker's ``max.message.bytes`` fails the agent) is cut to that
    size, and the header ``dead-letter-truncated-from`` gives its full size.
    """
    value = record.value
    headers = dead_letter_headers(record, error)
    limit = _DEAD_LETTER_MAX_BYTES
    if value is not None and len(value) > limit:
        headers.append((TRUNCATED_HEADER, str(len(value)).encode("ascii")))
        value = value[:limit]
    await outbox.send(
        dead_letter_topic.get_topic_name(), key=record.key, value=value, headers=headers
    )


def _make_agent(source: SourceConfig) -> AgentFun:
    async def ingest(stream: StreamT) -> None:
        async for event in manual_acks(stream).events():
            started_s = time.perf_counter()
            records = len(event.value)
            outbox = await ingest_batch(event.value, source, event.message.partition)
            latency.observe("ingest", time.perf_counter() - started_s, records)
            ack = timed_ack(event, "ingest_to_publish", started_s, records)
            await in_flight.hand_over(outbox, ack)

    ingest.__name__ = f"ingest_{source.name}"
    ingest.__qualname__ = ingest.__name__
    return ingest


ingest_agents = {
    source.name: app.agent(source_topic(source.topic), name=f"ingest-{source.name}")(
        _make_agent(source)
    )
    for source in rules.sources
}


@app.timer(interval=30.0)
async def _log_counts() -> None:
    counters.log()
