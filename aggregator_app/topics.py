"""The Kafka topics of the service; every one has ``rules.partitions`` partitions.

Detector topics (one per source in the rules file) carry producers' own bytes.
``detector-events`` is internal: accepted events in the unified schema, keyed by
camera id, so that one camera's events meet one worker and its tables. Its
records carry the event time as their timestamp.
"""

from __future__ import annotations

from faust.types import TopicT

from aggregator_app.app import app, rules

__all__ = [
    "TICK_HEADER",
    "aggregated_topic",
    "dead_letter_topic",
    "detector_events_topic",
    "source_topic",
]

#: Header of a control record on ``detector-events`` that asks the owner of its
#: partition to close idle spans; it carries no event.
TICK_HEADER = "x-aggregator-tick"

# ``internal`` makes the worker create every topic with the partition count
# above, instead of relying on the broker's auto-creation and its default count.
_RAW = {"key_serializer": "raw", "value_serializer": "raw", "internal": True}

detector_events_topic = app.topic(
    f"{app.conf.id}-detector-events",
    partitions=rules.partitions,
    **_RAW,
)
aggregated_topic = app.topic(
    rules.aggregated_topic, partitions=rules.partitions, **_RAW
)
dead_letter_topic = app.topic(
    rules.dead_letter_topic, partitions=rules.partitions, **_RAW
)


def source_topic(name: str) -> TopicT:
    """Return the topic of one detector source."""
    return app.topic(name, partitions=rules.partitions, **_RAW)


@app.task
async def _declare_output_topics() -> None:
    """Create the topics this worker only writes to, with our partition count."""
    for topic in (aggregated_topic, dead_letter_topic):
        await topic.maybe_declare()
