"""The Kafka topics of the service; every one has ``rules.partitions`` partitions.

Detector topics (one per source in the rules file) carry producers' own bytes.
``detector-events`` is internal: accepted events in the unified schema, keyed by
camera id, so that one camera's events meet one worker and its tables. Its
records carry the event time as their timestamp.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from aiokafka.partitioner import murmur2
from faust.types import Message, TopicT

from aggregator_app.app import app, rules
from aggregator_app.transport import BATCHED_TOPICS

__all__ = [
    "TICK_HEADER",
    "TOPIC_CONFIG",
    "aggregated_topic",
    "assignments_topic",
    "correlation_topic",
    "dead_letter_topic",
    "detector_events_topic",
    "has_header",
    "late_events_topic",
    "partition_for_camera",
    "partition_for_site",
    "source_topic",
]

#: Header of a control record on ``detector-events`` that asks the owner of its
#: partition to close idle spans; it carries no event.
TICK_HEADER = "x-aggregator-tick"


#: Records carry event times as timestamps, and replayed recordings carry old
#: ones; Kafka's retention by time would delete them within minutes of their
#: arrival. Our topics are therefore bounded by size, per partition.
TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": str(2 * 1024**3)}


def _raw_topic(name: str, *, batched: bool = False) -> TopicT:
    """Declare a topic of our own bytes.

    ``batched``: an agent reading it gets the fetched records of a partition
    as one list (:mod:`aggregator_app.transport`). ``internal`` makes the
    worker create the topic with our partition count and config, instead of
    relying on the broker's auto-creation and defaults.
    """
    if batched:
        BATCHED_TOPICS.add(name)
    return app.topic(
        name,
        partitions=rules.partitions,
        key_serializer="raw",
        value_serializer="records" if batched else "raw",
        internal=True,
        config=TOPIC_CONFIG,
    )


def source_topic(name: str) -> TopicT:
    """Return the topic of one detector source, read in batches."""
    return _raw_topic(name, batched=True)


@functools.lru_cache(maxsize=65_536)
def partition_for_camera(camera_id: str) -> int:
    """Return the partition that holds a camera's events and dedup state.

    The same as the Kafka producers' default partitioner gives a record keyed
    by the camera id, in a topic of ``rules.partitions`` partitions.
    """
    return (murmur2(camera_id.encode()) & 0x7FFFFFFF) % rules.partitions


@functools.lru_cache(maxsize=4096)
def partition_for_site(site_id: str) -> int:
    """Return the partition of a site's correlation events and state."""
    return (murmur2(site_id.encode()) & 0x7FFFFFFF) % rules.partitions


def has_header(message: Message, name: str) -> bool:
    """Return whether a record carries a header called ``name``."""
    headers = message.headers or ()
    names = headers.keys() if isinstance(headers, Mapping) else (h[0] for h in headers)
    return name in names


detector_events_topic = _raw_topic(f"{app.conf.id}-detector-events", batched=True)
aggregated_topic = _raw_topic(rules.aggregated_topic)
dead_letter_topic = _raw_topic(rules.dead_letter_topic)
#: Accepted events keyed by site id: every camera of a site meets one worker.
correlation_topic = _raw_topic(f"{app.conf.id}-correlation", batched=True)
#: Per event, the global id correlation gave it: key event id, value JSON.
assignments_topic = _raw_topic(f"{app.conf.id}-assignments")
late_events_topic = _raw_topic(rules.correlation.late_events_topic)


@app.task
async def _declare_output_topics() -> None:
    """Create the topics this worker only writes to, with our partition count."""
    for topic in (
        aggregated_topic,
        dead_letter_topic,
        assignments_topic,
        late_events_topic,
    ):
        await topic.maybe_declare()
