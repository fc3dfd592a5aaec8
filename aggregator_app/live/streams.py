"""The two streams a worker serves, and how their records are read for clients.

``aggregated`` (cursor letter ``a``): every record of the aggregated topic,
whatever its ``type`` (``observation`` today; other types published there
stream alike), as published, from whichever worker published it.

``detector`` (letter ``d``), on request: the detector events, read from the
detector topics themselves and turned into unified events by the same
adapters as ingest. That source is complete across workers: every accepted
event is in one of these topics, whereas ``detector-events`` holds only the
events re-keyed there (those of records not keyed by camera), and the store
has no order to resume from. A message carries the events of one detector
record; it passes a filter when one of them does (``type`` there is the
detector kind: ``person``, ``vehicle``, ...). A record the adapters reject
is not streamed (it is on the dead-letter topic). A worker reads the detector
topics only while a client watches them, and a minute after the last one left.
"""

from __future__ import annotations

import logging
import time

import orjson
from aiokafka import ConsumerRecord

from aggregator_app.app import app, rules, settings
from aggregator_app.exceptions import RejectedEvent
from aggregator_app.ingest import REPLAY_HEADER, RawRecord, parse_record
from aggregator_app.live.filters import Facets, facets_of
from aggregator_app.live.hub import Decoded, Hub
from aggregator_app.topics import aggregated_topic
from rules.config import SourceConfig

__all__ = ["aggregated_hub", "decode_aggregated", "detector_hub", "hubs"]

logger = logging.getLogger(__name__)

#: The detector topics are read while someone watches, and this long after.
_DETECTOR_IDLE_STOP_S = 60.0


def decode_aggregated(record: ConsumerRecord) -> Decoded | None:
    """Return an aggregated record for clients; ``None`` if it is not JSON."""
    try:
        event = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        logger.warning(
            "live: aggregated record is not JSON: partition=%d offset=%d",
            record.partition,
            record.offset,
        )
        return None
    if not isinstance(event, dict):
        return None
    body = record.value
    if b"\n" in body or b"\r" in body:  # one SSE data line: no line breaks
        body = orjson.dumps(event)
    return Decoded(kind="aggregated", body=body, facets=(facets_of(event),))


_SOURCES: dict[str, SourceConfig] = {source.topic: source for source in rules.sources}


def decode_detector(record: ConsumerRecord) -> Decoded | None:
    """Return the unified events of a detector record; ``None`` if rejected."""
    source = _SOURCES[record.topic]
    headers = dict(record.headers or ())
    raw = RawRecord(
        value=record.value,
        key=record.key,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        replayed=REPLAY_HEADER in headers,
    )
    try:
        events = parse_record(
            raw, source=source, rules=rules, now_ms=int(time.time() * 1000)
        )
    except RejectedEvent:
        return None
    if not events:
        return None
    body = b'{"type":"detection","source":"%s","events":[%s]}' % (
        source.name.encode(),
        b",".join(event.json_text.encode() for event in events),
    )
    facets = tuple(
        Facets(
            type=str(event.detector),
            camera_id=event.camera_id,
            site_id=event.site_id,
            zone_id=event.zone_id,
            confidence=event.confidence,
        )
        for event in events
    )
    return Decoded(kind="detection", body=body, facets=facets)


async def _declare_aggregated() -> None:
    await aggregated_topic.maybe_declare()


aggregated_hub = Hub(
    name="a",
    topics=[rules.aggregated_topic],
    partitions=rules.partitions,
    decode=decode_aggregated,
    bootstrap=settings.kafka_bootstrap,
    before_start=_declare_aggregated,
)
detector_hub = Hub(
    name="d",
    topics=[source.topic for source in rules.sources],
    partitions=rules.partitions,
    decode=decode_detector,
    bootstrap=settings.kafka_bootstrap,
    idle_stop_s=_DETECTOR_IDLE_STOP_S,
)
hubs = {"aggregated": aggregated_hub, "detector": detector_hub}


@app.on_before_shutdown.connect  # type: ignore[arg-type]  # stub wants a positional-only sender
async def _stop_hubs(sender: object, *args: object, **kwargs: object) -> None:
    for hub in hubs.values():
        await hub.stop()
