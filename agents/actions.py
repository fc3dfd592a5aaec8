"""Cross-detector actions in the camera-partitioned path.

:func:`act_on_batch` is called by :func:`agents.dedup.deduplicate_batch` with
the same events, so it runs wherever one camera's events meet: inside the
iteration of an agent over a batch of a partition co-partitioned with the
action table (:mod:`tables.actions`). It feeds the events to the pure core
(:mod:`aggregator_app.actions`), publishes the actions it decides to the
aggregated topic, stores them, and writes the changed camera states to the
table, with their changelog records in the batch's outbox.

A partition that receives nothing decides what waits once it has been quiet
for ``actions.close_after_idle_s`` (wall clock): the dedup agent's idle tick
reaches this function as a batch without events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from aggregator_app import sink
from aggregator_app.actions import ActionMatcher, Positioned
from aggregator_app.app import app, rules
from aggregator_app.metrics import counters
from aggregator_app.outbox import Outbox
from aggregator_app.schema import ActionEvent
from aggregator_app.topics import aggregated_topic
from tables.actions import ActionStateStore

__all__ = ["act_on_batch", "matcher"]

logger = logging.getLogger(__name__)

matcher = ActionMatcher(rules.actions)
_state_store = ActionStateStore()
_last_event_s: dict[int, float] = {}


async def act_on_batch(
    events: Sequence[Positioned], *, partition: int, outbox: Outbox
) -> None:
    """Run the action rules over one batch of ``partition``; publish what they decide.

    Steps:
        1. Feed the events to the matcher (or, for a quiet partition, decide
           what waits).
        2. Publish and store every action decided.
        3. Write the changed camera states and queue their changelog.
    """
    if not matcher.enabled:
        return

    # Step 1.
    late_before = matcher.late_events
    now_s = time.monotonic()
    if events:
        _last_event_s[partition] = now_s
        latest_ms = int((time.time() + rules.dedup.watermark_max_lead_s) * 1000)
        decided = matcher.observe_batch(
            events, partition=partition, latest_ms=latest_ms
        )
    elif now_s - _last_event_s.get(partition, now_s) >= _idle_s():
        decided = matcher.decide_all(partition)
    else:
        decided = []
    counters.actions_late += matcher.late_events - late_before

    # Step 2.
    for action in decided:
        await _publish(action, outbox)

    # Step 3.
    await _write_state(partition, outbox)


def _idle_s() -> float:
    return rules.actions.close_after_idle_s


async def _publish(action: ActionEvent, outbox: Outbox) -> None:
    await outbox.send(
        aggregated_topic.get_topic_name(),
        key=action.aggregated_id.encode(),
        value=action.json_text.encode(),
        partition_key=action.camera_id.encode(),
        timestamp_ms=action.start_time_ms,
    )
    counters.actions_published += 1
    sink.action_event(action)


async def _write_state(partition: int, outbox: Outbox) -> None:
    """Write the cameras this batch changed; all belong to ``partition``."""
    for camera_id, camera_partition, state in matcher.take_changes():
        if camera_partition != partition:
            logger.error(
                "actions: camera state changed outside its partition: "
                "camera=%s partition=%d batch_partition=%d",
                camera_id,
                camera_partition,
                partition,
            )
            continue
        _state_store.put(camera_id, state)
    await _state_store.send_changelog(partition, outbox)


@_state_store.table.on_recover
async def _on_recovered() -> None:
    """Load every camera state this worker holds, before any record is processed."""
    now_s = time.monotonic()
    cameras = 0
    for camera_id, state in _state_store.states():
        matcher.load(camera_id, state)
        _last_event_s.setdefault(int(state["partition"]), now_s)
        cameras += 1
    logger.info("actions: camera states restored: cameras=%d", cameras)


@app.on_partitions_revoked.connect  # type: ignore[arg-type]  # stub wants a positional-only sender
async def _on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
    matcher.reset()
    logger.info("actions: partitions revoked, camera states cleared")
