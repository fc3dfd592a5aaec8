"""One ingest agent per detector source declared in the rules file.

Each agent reads its topic's raw bytes, turns every message into unified
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
from collections.abc import Callable, Coroutine
from typing import Any

from faust.types import EventT, StreamT

from agents.dedup import deduplicate
from aggregator_app.app import app, rules
from aggregator_app.exceptions import RejectedEvent
from aggregator_app.ingest import (
    REPLAY_HEADER,
    RawRecord,
    dead_letter_headers,
    parse_record,
)
from aggregator_app.metrics import counters
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


def _raw_record(event: EventT) -> RawRecord:
    message = event.message
    return RawRecord(
        value=message.value,
        key=message.key,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
        replayed=has_header(event, REPLAY_HEADER),
    )


async def _forward(event: EventT, source: SourceConfig) -> None:
    record = _raw_record(event)
    counters.received += 1
    try:
        detector_events = parse_record(
            record, source=source, rules=rules, now_ms=int(time.time() * 1000)
        )
    except RejectedEvent as error:
        counters.reject(error.reason)
        await _dead_letter(record, error)
        return

    counters.accepted_messages += 1
    for index, detector_event in enumerate(detector_events):
        counters.accepted_events += 1
        if partition_for_camera(detector_event.camera_id) == record.partition:
            position = f"{record.topic}/{record.partition}/{record.offset}/{index}"
            await deduplicate(
                detector_event, partition=record.partition, position=position
            )
            continue
        await detector_events_topic.send(
            key=detector_event.camera_id.encode(),
            value=detector_event.model_dump_json().encode(),
            timestamp=detector_event.event_time_ms / 1000,
        )


async def _dead_letter(record: RawRecord, error: RejectedEvent) -> None:
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
    await dead_letter_topic.send(key=record.key, value=value, headers=headers)


def _make_agent(source: SourceConfig) -> AgentFun:
    async def ingest(stream: StreamT) -> None:
        async for event in stream.events():
            await _forward(event, source)

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
