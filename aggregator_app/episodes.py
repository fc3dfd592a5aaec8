"""Temporal fusion of one global object's observations into episodes: the pure core.

Input: observations of objects that cross-camera correlation has given a
global id (global id, event time, camera, ground position, confidence).
Output: one :class:`~aggregator_app.schema.EpisodeEvent` per **episode**, a
maximal run of an object's observations in which consecutive ones are less
than ``gap_s`` apart in event time.

State lives in **hopping windows** of ``size_s`` every ``step_s``, kept as
panes of ``step_s`` (a window is ``size_s / step_s`` consecutive panes, so
each observation is stored once): key ``(global id, pane start)``. An
episode is assembled from the panes of its object at emission; where the
panes and windows fall never changes what is emitted (a test shifts them).

When an episode is emitted: once, final (``status: closed``), as soon as
``watermark - grace_s > end + gap_s``: the object has been quiet for
``gap_s`` and an observation that could still extend the episode would be
late. The watermark is per site: the highest event time seen for the site
(or one given by the caller, e.g. correlation's site watermark, through
:meth:`EpisodeFuser.advance`). An observation older than ``watermark -
grace_s`` is late: it is counted and dropped. Within the grace, arrival
order changes nothing. ``aggregated_id = episode:<global id>:<start ms>``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aggregator_app.schema import EpisodeEvent, PathPoint
from rules.config import EpisodeRule

__all__ = ["EpisodeFuser", "Observation", "PaneKey", "thin_path"]

#: ``(global id, pane start ms)``.
PaneKey = tuple[str, int]


@dataclass(frozen=True, slots=True, order=True)
class Observation:
    """One sighting of a global object (ordered by time, then camera)."""

    event_time_ms: int
    camera_id: str
    global_id: str
    site_id: str = ""
    x_m: float | None = None
    y_m: float | None = None
    confidence: float | None = None
    event_id: str = ""

    def to_json(self) -> list[Any]:
        return [
            self.event_time_ms,
            self.camera_id,
            self.global_id,
            self.site_id,
            self.x_m,
            self.y_m,
            self.confidence,
            self.event_id,
        ]

    @classmethod
    def from_json(cls, data: list[Any]) -> Observation:
        return cls(*data)


def thin_path(
    points: list[Observation], *, min_distance_m: float, max_points: int
) -> list[PathPoint]:
    """Keep the first and last point, and points ``min_distance_m`` from the last kept.

    Points without a position are skipped. More than ``max_points`` left are
    sampled evenly, first and last kept.
    """
    placed = [
        PathPoint(time_ms=p.event_time_ms, camera_id=p.camera_id, x_m=p.x_m, y_m=p.y_m)
        for p in points
        if p.x_m is not None and p.y_m is not None
    ]
    if len(placed) <= 2:
        return placed
    kept = [placed[0]]
    for point in placed[1:-1]:
        last = kept[-1]
        if math.dist((point.x_m, point.y_m), (last.x_m, last.y_m)) >= min_distance_m:
            kept.append(point)
    kept.append(placed[-1])
    if len(kept) <= max_points:
        return kept
    step = (len(kept) - 1) / (max_points - 1)
    return [kept[round(index * step)] for index in range(max_points)]


@dataclass(slots=True)
class _Object:
    """What is held of one global object: its panes, and its site."""

    site_id: str
    partition: int
    panes: dict[int, list[Observation]] = field(default_factory=dict)


class EpisodeFuser:
    """Holds observations by hopping-window pane and emits finished episodes.

    Not thread-safe; one instance serves the partitions of one worker.
    """

    def __init__(self, rule: EpisodeRule) -> None:
        self.rule = rule
        self._step_ms = round(rule.step_s * 1000)
        self._gap_ms = round(rule.gap_s * 1000)
        self._grace_ms = round(rule.grace_s * 1000)
        self._objects: dict[str, _Object] = {}
        self._watermark_ms: dict[str, int] = {}
        self._dirty: set[PaneKey] = set()
        self.late_observations = 0

    def pane_start_ms(self, time_ms: int) -> int:
        """Return the start of the pane (``step_s``) that holds ``time_ms``."""
        return time_ms - time_ms % self._step_ms

    def windows_of(self, time_ms: int) -> list[tuple[int, int]]:
        """Return the hopping windows ``[start, end)`` ms that hold ``time_ms``."""
        size_ms = round(self.rule.size_s * 1000)
        first = self.pane_start_ms(time_ms) - size_ms + self._step_ms
        return [
            (start, start + size_ms)
            for start in range(first, time_ms + 1, self._step_ms)
            if start <= time_ms < start + size_ms
        ]

    def watermark_ms(self, site_id: str) -> int | None:
        """Return a site's watermark, if any observation of it was seen."""
        return self._watermark_ms.get(site_id)

    def observe(self, observation: Observation, *, partition: int) -> None:
        """Hold an observation, unless it is late or held already."""
        site = observation.site_id
        watermark_ms = self._watermark_ms.get(site)
        if (
            watermark_ms is not None
            and observation.event_time_ms < watermark_ms - self._grace_ms
        ):
            self.late_observations += 1
            return
        self.advance(site, observation.event_time_ms)

        held = self._objects.setdefault(
            observation.global_id, _Object(site_id=site, partition=partition)
        )
        pane_ms = self.pane_start_ms(observation.event_time_ms)
        pane = held.panes.setdefault(pane_ms, [])
        if observation not in pane:
            pane.append(observation)
            self._dirty.add((observation.global_id, pane_ms))

    def held(self, global_id: str) -> list[Observation]:
        """Return the observations of an object not yet in an emitted episode."""
        held = self._objects.get(global_id)
        if held is None:
            return []
        return sorted(o for pane in held.panes.values() for o in pane)

    @property
    def open_objects(self) -> int:
        """Return how many global objects have observations not yet emitted."""
        return len(self._objects)

    def has_open(self, site_id: str) -> bool:
        """Return whether a site has observations not yet in an emitted episode."""
        return any(held.site_id == site_id for held in self._objects.values())

    def advance(self, site_id: str, watermark_ms: int) -> None:
        """Move a site's watermark on (never back)."""
        if watermark_ms > self._watermark_ms.get(site_id, -1):
            self._watermark_ms[site_id] = watermark_ms

    def close_due(self) -> list[EpisodeEvent]:
        """Return every episode now final, and forget its observations.

        An emitted episode's observations are gone from the state, and any
        observation that could belong to it is late from then on: each
        episode is emitted once.

        Steps:
            1. Per object, gather its panes and split the observations into
               runs at gaps of ``gap_s`` or more.
            2. A run whose end + ``gap_s`` is before the site's watermark -
               ``grace_s`` is final: emit it.
            3. Drop the emitted observations from their panes.
        """
        emitted = []
        for global_id, held in list(self._objects.items()):
            # Step 1.
            observations = sorted(o for pane in held.panes.values() for o in pane)
            watermark_ms = self._watermark_ms.get(held.site_id, 0)

            # Step 2.
            for run in self._runs(observations):
                quiet_until_ms = run[-1].event_time_ms + self._gap_ms
                if quiet_until_ms < watermark_ms - self._grace_ms:
                    emitted.append(self._episode(global_id, run))
                    # Step 3.
                    self._drop(global_id, held, run)
            if not held.panes:
                del self._objects[global_id]
        return emitted

    def take_changes(self) -> list[tuple[PaneKey, int, list[list[Any]] | None]]:
        """Return ``(pane key, partition, observations or None)`` of changed panes."""
        changes = []
        for global_id, pane_ms in sorted(self._dirty):
            held = self._objects.get(global_id)
            pane = None if held is None else held.panes.get(pane_ms)
            partition = -1 if held is None else held.partition
            value = None if not pane else [o.to_json() for o in pane]
            changes.append(((global_id, pane_ms), partition, value))
        self._dirty.clear()
        return changes

    def load(
        self, key: PaneKey, observations: Iterable[list[Any]], partition: int
    ) -> None:
        """Take back a stored pane (after a restart)."""
        global_id, pane_ms = key
        for data in observations:
            observation = Observation.from_json(data)
            held = self._objects.setdefault(
                global_id, _Object(site_id=observation.site_id, partition=partition)
            )
            held.panes.setdefault(pane_ms, []).append(observation)
            self.advance(observation.site_id, observation.event_time_ms)

    def reset(self) -> None:
        """Forget everything held in memory (the partitions were revoked)."""
        self._objects.clear()
        self._watermark_ms.clear()
        self._dirty.clear()

    def _runs(self, observations: list[Observation]) -> list[list[Observation]]:
        runs: list[list[Observation]] = []
        for observation in observations:
            if (
                runs
                and observation.event_time_ms - runs[-1][-1].event_time_ms
                < self._gap_ms
            ):
                runs[-1].append(observation)
            else:
                runs.append([observation])
        return runs

    def _drop(self, global_id: str, held: _Object, run: list[Observation]) -> None:
        gone = set(run)
        for pane_ms in list(held.panes):
            kept = [o for o in held.panes[pane_ms] if o not in gone]
            if len(kept) != len(held.panes[pane_ms]):
                self._dirty.add((global_id, pane_ms))
            if kept:
                held.panes[pane_ms] = kept
            else:
                del held.panes[pane_ms]

    def _episode(self, global_id: str, run: list[Observation]) -> EpisodeEvent:
        cameras: list[str] = []
        for observation in run:
            if not cameras or cameras[-1] != observation.camera_id:
                cameras.append(observation.camera_id)
        path = thin_path(
            run,
            min_distance_m=self.rule.path_min_distance_m,
            max_points=self.rule.path_max_points,
        )
        confidences = [o.confidence for o in run if o.confidence is not None]
        start_ms, end_ms = run[0].event_time_ms, run[-1].event_time_ms
        return EpisodeEvent(
            aggregated_id=f"episode:{global_id}:{start_ms}",
            global_id=global_id,
            site_id=run[0].site_id or None,
            start_time_ms=start_ms,
            end_time_ms=end_ms,
            duration_ms=end_ms - start_ms,
            cameras=cameras,
            path=path,
            best_confidence=max(confidences, default=None),
            observation_count=len(run),
        )
