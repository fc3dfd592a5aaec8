"""The service mode of ``aggregator-evaluate``: through a running worker.

The worker runs with the same environment (``KAFKA_BOOTSTRAP``,
``AGGREGATOR_APP_ID``, ``AGGREGATOR_TOPIC_PREFIX``, ``AGGREGATOR_RULES``).
The evaluation notes the ends of ``<app id>-assignments``, the late-events
topic and ``aggregated-events``, replays the data set into its detector
topic (keyed by camera, the event time as record timestamp, with the replay
header), and reads from those ends until every event has a global id or was
reported late. Merges (``closed`` correlated events with ``merged_into``)
are read too and applied as a consumer would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from aggregator_app.ingest import REPLAY_HEADER
from aggregator_app.settings import load_settings
from rules.config import RulesConfig

if TYPE_CHECKING:
    from aggregator_app.evaluate import Labelled

__all__ = ["run_service"]

_ADAPTERS = {"garage": "deepstream", "tud": "mot"}


async def run_service(
    dataset: str,
    labelled: Sequence[Labelled],
    rules: RulesConfig,
    *,
    timeout_s: float,
    speed: float | None = None,
) -> tuple[dict[str, str], int]:
    """Replay ``labelled`` into the running worker; return its global ids.

    Returns every event's global id (merges applied) and how many events the
    service reported late.
    """
    from aggregator_app.evaluate import resolve_merges

    settings = load_settings()
    rules = rules.with_topic_prefix(settings.topic_prefix)
    source = next(s for s in rules.sources if s.adapter == _ADAPTERS[dataset])
    outputs = [
        f"{settings.app_id}-assignments",
        rules.correlation.late_events_topic,
        rules.aggregated_topic,
    ]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await _assign_at_end(consumer, outputs)
        await _replay(settings.kafka_bootstrap, source.topic, labelled, speed=speed)
        wanted = {item.event.event_id for item in labelled}
        assigned, merged, late = await _collect(
            consumer, outputs, wanted=wanted, timeout_s=timeout_s
        )
    finally:
        await consumer.stop()
    return resolve_merges(assigned, merged), len(late)


async def _assign_at_end(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> None:
    partitions: list[TopicPartition] = []
    for topic in topics:
        found = consumer.partitions_for_topic(topic)
        if not found:
            await consumer._client.force_metadata_update()  # noqa: SLF001  # no public refresh
            found = consumer.partitions_for_topic(topic) or set()
        if not found:
            raise SystemExit(f"evaluate: topic {topic} missing: is the worker running?")
        partitions.extend(TopicPartition(topic, p) for p in found)
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for partition in partitions:
        await consumer.position(partition)


async def _replay(
    bootstrap: str, topic: str, labelled: Sequence[Labelled], *, speed: float | None
) -> None:
    """Send the events in file order; ``speed`` times real time, or at once."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    started_s = time.monotonic()
    first_ms = labelled[0].event.event_time_ms if labelled else 0
    front_ms = first_ms
    try:
        for item in labelled:
            front_ms = max(front_ms, item.event.event_time_ms)
            if speed is not None:
                due_s = started_s + (front_ms - first_ms) / 1000 / speed
                await asyncio.sleep(max(0.0, due_s - time.monotonic()))
            await producer.send(
                topic,
                value=item.payload,
                key=item.key.encode(),
                timestamp_ms=item.event.event_time_ms,
                headers=[(REPLAY_HEADER, b"1")],
            )
        await producer.flush()
    finally:
        await producer.stop()


async def _collect(
    consumer: AIOKafkaConsumer,
    topics: Sequence[str],
    *,
    wanted: set[str],
    timeout_s: float,
) -> tuple[dict[str, str], dict[str, str], set[str]]:
    assignments_topic, late_topic, aggregated = topics
    assigned: dict[str, str] = {}
    merged: dict[str, str] = {}
    late: set[str] = set()
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s and not wanted <= assigned.keys() | late:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            for record in records:
                if record.topic == assignments_topic:
                    value = json.loads(record.value or b"{}")
                    assigned[value["event_id"]] = value["global_id"]
                elif record.topic == late_topic:
                    late.add((record.key or b"").decode())
                elif record.topic == aggregated:
                    _merge_of(record.value, merged)
    if not wanted <= assigned.keys() | late:
        missing = len(wanted - assigned.keys() - late)
        print(f"evaluate: timed out with {missing} events undecided")
    return {k: v for k, v in assigned.items() if k in wanted}, merged, late & wanted


def _merge_of(value: bytes | None, merged: dict[str, str]) -> None:
    event = json.loads(value or b"{}")
    if event.get("type") == "correlated" and event.get("merged_into"):
        merged[event["global_id"]] = event["merged_into"]
