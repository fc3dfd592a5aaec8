"""Temporal fusion: a batch of (global id, event) pairs in, episodes out.

The correlation agent (:mod:`agents.correlate`) calls :func:`fuse_batch` for
every batch of a site's partition of the correlation topic, with the events
it decided there (each with its global id) and the sites' watermarks. Every
global id of a site is made on that partition, so the episode table
(:mod:`tables.episodes`) is co-partitioned with the correlation topic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aggregator_app import sink
from aggregator_app.app import app, rules
from aggregator_app.episodes import EpisodeFuser, Observation
from aggregator_app.metrics import counters
from aggregator_app.outbox import Outbox
from aggregator_app.schema import DetectorEvent, EpisodeEvent
from aggregator_app.topics import aggregated_topic
from tables.episodes import EpisodePaneStore

__all__ = ["advance_site", "fuse_batch", "fuser", "observation_of"]

logger = logging.getLogger(__name__)

fuser = EpisodeFuser(rules.episodes)
_pane_store = EpisodePaneStore()


def observation_of(global_id: str, event: DetectorEvent) -> Observation:
    """Return what fusion keeps of an event: time, camera, position, confidence."""
    position = event.position
    return Observation(
        event_time_ms=event.event_time_ms,
        camera_id=event.camera_id,
        global_id=global_id,
        site_id=event.site_id or "",
        x_m=None if position is None else position.x_m,
        y_m=None if position is None else position.y_m,
        confidence=event.confidence,
        event_id=event.event_id,
    )


def advance_site(site_id: str | None, watermark_ms: int) -> None:
    """Take a site's watermark from correlation (never moves it back)."""
    fuser.advance(site_id or "", watermark_ms)


async def fuse_batch(
    pairs: Sequence[tuple[str, DetectorEvent]],
    *,
    partition: int,
    outbox: Outbox,
    site_watermarks_ms: Mapping[str, int] | None = None,
) -> list[EpisodeEvent]:
    """Fuse one batch of ``partition``; publish and store the episodes it ends.

    Must run inside the iteration of an agent over a batch of ``partition``
    of a topic keyed by global id (see the module docstring). Returns the
    episodes published.
    """
    for global_id, event in pairs:
        fuser.observe(observation_of(global_id, event), partition=partition)
    # Correlation decides events once its watermark has passed them: the
    # watermark moves after the batch's events are held, or they would be late.
    for site_id, watermark_ms in (site_watermarks_ms or {}).items():
        advance_site(site_id, watermark_ms)
    episodes = fuser.close_due()

    for episode in episodes:
        await outbox.send(
            aggregated_topic.get_topic_name(),
            key=episode.aggregated_id.encode(),
            value=episode.json_text.encode(),
            partition_key=episode.global_id.encode(),
            timestamp_ms=episode.start_time_ms,
        )
        sink.episode_event(episode)
        counters.episodes_published += 1

    for key, _partition, observations in fuser.take_changes():
        _pane_store.put(key, observations)
    await _pane_store.send_changelog(partition, outbox)
    return episodes


@_pane_store.table.on_recover
async def _on_recovered() -> None:
    """Load every pane this worker holds, before any record is processed."""
    panes = 0
    for key, observations in _pane_store.panes():
        fuser.load(key, observations, partition=-1)
        panes += 1
    logger.info("episodes: panes restored: panes=%d", panes)


@app.on_partitions_revoked.connect  # type: ignore[arg-type]  # stub wants a positional-only sender
async def _on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
    fuser.reset()
