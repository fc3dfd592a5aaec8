"""Correlation of detector events across cameras: the pure core, without Kafka.

Events of one site that are about the same physical object get one *global
id*. The object keeps it while it moves from camera to camera, while several
cameras see it at once, and over the repeats of one camera.

Where an event is:

* its ground-plane position in metres, when the producer gives one;
* else the foot point of its box (bottom centre) through the camera's
  image-to-ground homography from the rules file;
* else only its zone, matched through the zone adjacency of the rules file.

How an event is assigned (events are decided in event-time order, see below):

1. A track whose camera saw the same tracker id within ``max_gap_s`` takes it:
   a camera's own tracker is a strong hint.
2. Otherwise every open track seen within ``max_gap_s`` is a candidate, except
   a track holding a camera that the rules declare must-not-link with the
   event's camera, and a track that already holds an event of the same camera
   at the same instant (one camera never sees one object twice in a frame).
3. A candidate's distance is measured from its predicted position: the last
   point of the same camera moved by the track's velocity when that camera
   saw it recently (gate ``same_camera_gate_m``), else the nearest predicted
   last point of its other cameras (gate ``cross_camera_gate_m``). The
   nearest candidate within its gate takes the event; with none, the event
   opens a new track, whose global id is made from the site and the event id.

Event time: every camera has a watermark, the highest event time it sent
minus ``grace_s``. The site's watermark is the lowest watermark of its active
cameras and never moves back; a camera that sent nothing for
``idle_camera_after_s`` of wall-clock time is not active, so a silent camera
does not hold time back, and a camera whose clock runs ahead cannot move time
for the others. Events wait in a buffer until the site watermark passes them
and are then decided in ``(event time, camera, event id)`` order: within the
grace period the outcome does not depend on the arrival order. An event at or
behind the site watermark when it arrives is *late*: it is not correlated and
is reported once, with how late it was. The cost is latency: an event is
decided ``grace_s`` after its camera has sent a later one, and no sooner than
the slowest active camera allows.

Once every camera of a site is quiet, its watermark reaches the newest event
and then follows the wall clock. A track closes when the site watermark is
``close_after_s`` past its last event; it takes no event after ``max_gap_s``
in any case, so closing never changes an assignment.

Two tracks that one event lies within ``merge_gate_m`` of, with no camera in
common and no must-not-link pair between them, are one object: the younger
is closed with ``merged_into`` naming the older, and a consumer reads its
events as the older's (the evaluation does so).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from aggregator_app.schema import DetectorEvent
from rules.config import CorrelationRule

__all__ = [
    "Assignment",
    "Correlator",
    "LateEvent",
    "SiteState",
    "Step",
    "Track",
    "ground_position",
]

Point = tuple[float, float]


@dataclass(slots=True)
class CameraPoint:
    """The last point of a track seen by one camera."""

    time_ms: int
    x_m: float | None
    y_m: float | None
    zone_id: str | None
    tracker_id: str | None


@dataclass(slots=True)
class Track:
    """One physical object of a site, as seen so far."""

    global_id: str
    site_id: str
    first_ms: int
    last_ms: int
    member_count: int = 0
    member_ids: list[str] = field(default_factory=list)
    cameras: dict[str, CameraPoint] = field(default_factory=dict)
    all_cameras: list[str] = field(default_factory=list)
    velocity_mps: tuple[float, float] = (0.0, 0.0)
    last_position: tuple[float, float] | None = None
    closed: bool = False
    merged_into: str | None = None

    def to_json(self) -> dict[str, object]:
        """Return the track as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Track:
        """Build a track from :meth:`to_json` output."""
        values = dict(data)
        cameras = values.pop("cameras")
        velocity = values.pop("velocity_mps")
        position = values.pop("last_position")
        track = cls(**values)  # type: ignore[arg-type]  # keys are ours, from to_json
        track.cameras = {
            name: CameraPoint(**point)  # type: ignore[arg-type]  # from to_json
            for name, point in cameras.items()  # type: ignore[attr-defined]  # a dict
        }
        track.velocity_mps = tuple(velocity)  # type: ignore[assignment, arg-type]  # 2 floats
        track.last_position = None if position is None else tuple(position)  # type: ignore[assignment, arg-type]  # 2 floats
        return track


@dataclass(frozen=True, slots=True)
class Assignment:
    """The global id given to one event."""

    event_id: str
    global_id: str
    site_id: str
    camera_id: str
    event_time_ms: int
    #: The event itself, for what is fused from it (episodes); not compared.
    event: DetectorEvent | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class LateEvent:
    """An event that came behind the site watermark, and by how much."""

    event: DetectorEvent
    late_by_ms: int
    watermark_ms: int


@dataclass(slots=True)
class Step:
    """What one call to the correlator decided."""

    assignments: list[Assignment] = field(default_factory=list)
    opened: list[Track] = field(default_factory=list)
    closed: list[Track] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        """Add what another step decided."""
        self.assignments.extend(other.assignments)
        self.opened.extend(other.opened)
        self.closed.extend(other.closed)
        self.late.extend(other.late)


@dataclass(slots=True)
class SiteState:
    """Everything the correlator keeps for one site; JSON for the table."""

    site_id: str
    watermark_ms: int = -1
    camera_watermark_ms: dict[str, int] = field(default_factory=dict)
    pending: list[DetectorEvent] = field(default_factory=list)
    tracks: dict[str, Track] = field(default_factory=dict)
    recent: dict[str, str] = field(default_factory=dict)
    recent_ms: dict[str, int] = field(default_factory=dict)
    late_ids: list[str] = field(default_factory=list)
    #: The ids of ``pending``, for lookups; not stored.
    pending_ids: set[str] = field(default_factory=set, repr=False)

    def to_json(self, *, with_pending: bool = True) -> dict[str, object]:
        """Return the state as a JSON-ready dict.

        ``with_pending=False`` leaves the pending events out: the table
        stores them one key each, as a fast replay may buffer thousands.
        """
        return {
            "site_id": self.site_id,
            "watermark_ms": self.watermark_ms,
            "camera_watermark_ms": dict(self.camera_watermark_ms),
            "pending": [event.json_text for event in self.pending]
            if with_pending
            else [],
            "tracks": {key: track.to_json() for key, track in self.tracks.items()},
            "recent": dict(self.recent),
            "recent_ms": dict(self.recent_ms),
            "late_ids": list(self.late_ids),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> SiteState:
        """Build a state from :meth:`to_json` output."""
        values = dict(data)
        tracks = values.pop("tracks")
        pending = values.pop("pending")
        state = cls(**values)  # type: ignore[arg-type]  # keys are ours, from to_json
        state.tracks = {
            key: Track.from_json(track)
            for key, track in tracks.items()  # type: ignore[attr-defined]  # a dict
        }
        state.pending = [
            DetectorEvent.model_validate_json(text)
            for text in pending  # type: ignore[attr-defined]  # a list of str
        ]
        return state


def ground_position(event: DetectorEvent, rule: CorrelationRule) -> Point | None:
    """Return where an event is on the ground plane, in metres, if known.

    The producer's own position first; else the box's foot point through the
    camera's homography (pixels when the box is in pixels).
    """
    if event.position is not None:
        return event.position.x_m, event.position.y_m
    matrix = rule.homographies.get(event.camera_id)
    if matrix is None or event.bbox_px is None:
        return None
    box = event.bbox_px
    foot_x, foot_y = (box.x_min + box.x_max) / 2, box.y_max
    row_x, row_y, row_w = matrix
    w = row_w[0] * foot_x + row_w[1] * foot_y + row_w[2]
    if abs(w) < 1e-12:
        return None
    x_m = (row_x[0] * foot_x + row_x[1] * foot_y + row_x[2]) / w
    y_m = (row_y[0] * foot_x + row_y[1] * foot_y + row_y[2]) / w
    return x_m, y_m


def _sort_key(event: DetectorEvent) -> tuple[int, str, str]:
    return event.event_time_ms, event.camera_id, event.event_id


class Correlator:
    """Assigns global ids to the events of every site it is given.

    Not thread-safe. State lives in :class:`SiteState` objects, one per site,
    which the owner may store and give back (:meth:`load`) after a restart.
    Wall-clock times (``now_s``) are passed in, so that tests and the
    in-process evaluation choose their own clock.
    """

    def __init__(self, rule: CorrelationRule) -> None:
        self.base_rule = rule
        self.rule = rule
        self.sites: dict[str, SiteState] = {}
        self._grace_ms = int(rule.grace_s * 1000)
        self._close_after_ms = int(rule.close_after_s * 1000)
        self._max_gap_ms = int(rule.max_gap_s * 1000)
        self._forbidden = rule.must_not_link_map()
        self._camera_seen_s: dict[str, dict[str, float]] = {}
        self._site_rules: dict[str, CorrelationRule] = {}
        self.late_count = 0

    def _use_site(self, site_id: str) -> None:
        """Put the rule of a site in force (its ``site_overrides``)."""
        rule = self._site_rules.get(site_id)
        if rule is None:
            rule = self._site_rules[site_id] = self.base_rule.for_site(site_id)
        self.rule = rule
        self._max_gap_ms = int(rule.max_gap_s * 1000)

    def site(self, site_id: str) -> SiteState:
        """Return the state of a site, made empty when it is new."""
        state = self.sites.get(site_id)
        if state is None:
            state = self.sites[site_id] = SiteState(site_id=site_id)
        return state

    def load(self, state: SiteState, *, now_s: float) -> None:
        """Take back a stored site state; its cameras count as seen ``now_s``."""
        self.sites[state.site_id] = state
        self._camera_seen_s[state.site_id] = dict.fromkeys(
            state.camera_watermark_ms, now_s
        )

    def watermark_ms(self, site_id: str) -> int:
        """Return a site's watermark: events at or before it are decided."""
        return self.site(site_id).watermark_ms

    def add(self, events: Iterable[DetectorEvent], *, now_s: float) -> Step:
        """Take in events (any site), then decide what the watermarks allow.

        Steps:
            1. Drop redeliveries; report late events once each.
            2. Buffer the others and move their cameras' watermarks.
            3. Move each touched site's watermark; decide the events it passed
               in event-time order; close the tracks it left behind.
        """
        step = Step()
        touched: set[str] = set()
        for event in events:
            site_id = event.site_id or ""
            touched.add(site_id)
            self._take(self.site(site_id), event, now_s=now_s, step=step)

        for site_id in sorted(touched):
            step.extend(self.advance(site_id, now_s=now_s))
        return step

    def advance(self, site_id: str, *, now_s: float, flush: bool = False) -> Step:
        """Move a site's watermark by its active cameras and decide what it passed.

        ``flush`` decides every pending event and closes every track (the end
        of a replay, or a site whose every camera has gone quiet for good).
        """
        state = self.site(site_id)
        self._use_site(site_id)
        new_ms = self._site_watermark_ms(state, now_s=now_s, flush=flush)
        if new_ms <= state.watermark_ms and not flush:
            # Nothing new is due: deciding and closing follow the watermark.
            return Step()
        state.watermark_ms = max(state.watermark_ms, new_ms)
        return self._decide(state, flush=flush)

    def advance_all(self, *, now_s: float, flush: bool = False) -> Step:
        """Advance every known site (a timer in the worker does this)."""
        step = Step()
        for site_id in sorted(self.sites):
            step.extend(self.advance(site_id, now_s=now_s, flush=flush))
        return step

    def _take(
        self, state: SiteState, event: DetectorEvent, *, now_s: float, step: Step
    ) -> None:
        event_id = event.event_id
        known = state.recent.get(event_id)
        if known is not None:
            step.assignments.append(_assignment(event, known))
            return
        if event_id in state.late_ids or self._is_pending(state, event_id):
            return

        if event.event_time_ms <= state.watermark_ms:
            self._late(state, event, step)
            return

        state.pending.append(event)
        state.pending_ids.add(event.event_id)
        camera_id = event.camera_id
        seen = self._camera_seen_s.setdefault(state.site_id, {})
        seen[camera_id] = now_s
        mark_ms = event.event_time_ms - self._grace_ms
        if mark_ms > state.camera_watermark_ms.get(camera_id, -1):
            state.camera_watermark_ms[camera_id] = mark_ms

    def _is_pending(self, state: SiteState, event_id: str) -> bool:
        if len(state.pending_ids) != len(state.pending):
            state.pending_ids = {event.event_id for event in state.pending}
        return event_id in state.pending_ids

    def _late(self, state: SiteState, event: DetectorEvent, step: Step) -> None:
        late_by_ms = state.watermark_ms - event.event_time_ms
        step.late.append(
            LateEvent(
                event=event, late_by_ms=late_by_ms, watermark_ms=state.watermark_ms
            )
        )
        self.late_count += 1
        state.late_ids.append(event.event_id)
        del state.late_ids[: -self.rule.max_remembered_late]

    def _site_watermark_ms(self, state: SiteState, *, now_s: float, flush: bool) -> int:
        marks = state.camera_watermark_ms
        if flush:
            return max(marks.values(), default=state.watermark_ms) + self._grace_ms
        seen = self._camera_seen_s.get(state.site_id, {})
        idle_s = self.rule.idle_camera_after_s
        active = [
            mark_ms
            for camera_id, mark_ms in marks.items()
            if now_s - seen.get(camera_id, now_s) < idle_s
        ]
        if active:
            return min(active)
        return self._quiet_site_watermark_ms(state, seen, now_s=now_s)

    def _quiet_site_watermark_ms(
        self, state: SiteState, seen: Mapping[str, float], *, now_s: float
    ) -> int:
        """Return the watermark of a site whose every camera is quiet.

        Nothing holds time back: it reaches the newest event, and from then on
        follows the wall clock, so that the tracks of a silent site close
        ``close_after_s`` later instead of waiting for its next event.
        """
        newest_ms = max(state.camera_watermark_ms.values(), default=state.watermark_ms)
        last_seen_s = max(seen.values(), default=now_s)
        quiet_s = max(0.0, now_s - last_seen_s - self.rule.idle_camera_after_s)
        if math.isinf(quiet_s):
            return newest_ms + self._grace_ms
        return newest_ms + self._grace_ms + int(quiet_s * 1000)

    def _decide(self, state: SiteState, *, flush: bool) -> Step:
        step = Step()
        watermark_ms = state.watermark_ms
        ready = sorted(
            (e for e in state.pending if e.event_time_ms <= watermark_ms), key=_sort_key
        )
        if ready:
            state.pending = [e for e in state.pending if e.event_time_ms > watermark_ms]
            state.pending_ids = {e.event_id for e in state.pending}
        for event in ready:
            self._assign(state, event, step)

        self._close(state, step, flush=flush)
        self._forget(state)
        return step

    def _assign(self, state: SiteState, event: DetectorEvent, step: Step) -> None:
        position = ground_position(event, self.rule)
        track = self._match(state, event, position)
        if track is None:
            track = Track(
                global_id=f"{state.site_id}:{event.event_id}",
                site_id=state.site_id,
                first_ms=event.event_time_ms,
                last_ms=event.event_time_ms,
            )
            state.tracks[track.global_id] = track
            self._update(track, event, position)
            # As made, whatever the rest of the batch adds: published again
            # after a restart, the open record is the same.
            step.opened.append(Track.from_json(track.to_json()))
        else:
            self._update(track, event, position)
        track = self._merge_duplicates(state, track, event, position, step)
        state.recent[event.event_id] = track.global_id
        state.recent_ms[event.event_id] = event.event_time_ms
        step.assignments.append(_assignment(event, track.global_id))

    def _merge_duplicates(
        self,
        state: SiteState,
        track: Track,
        event: DetectorEvent,
        position: Point | None,
        step: Step,
    ) -> Track:
        """Merge into one the tracks that turn out to be one object.

        An object entering a camera's view far from where the others place it
        opens a second track; once an event of one lies within
        ``merge_gate_m`` of the other, and the two share no camera and no
        must-not-link pair, they are one object. The older global id stays;
        the other is closed with ``merged_into`` naming it.
        """
        if position is None:
            return track
        # Cheap tests first, on every track; only the few near ones are sorted.
        near = [
            other
            for other in state.tracks.values()
            if other is not track
            and not other.closed
            and event.event_time_ms - other.last_ms <= self._max_gap_ms
            and self._within_merge_gate(other, event, position)
        ]
        for other in sorted(near, key=_age_key):
            if not self._mergeable(track, other, event):
                continue
            keep, gone = sorted((track, other), key=_age_key)
            self._absorb(keep, gone)
            step.closed.append(gone)
            track = keep
        return track

    def _within_merge_gate(
        self, other: Track, event: DetectorEvent, position: Point
    ) -> bool:
        distance_m = self._nearest_point_m(other, event, position)
        return distance_m is not None and distance_m <= self.rule.merge_gate_m

    def _mergeable(self, track: Track, other: Track, event: DetectorEvent) -> bool:
        if other.closed or event.event_time_ms - other.last_ms > self._max_gap_ms:
            return False
        if set(track.cameras).intersection(other.cameras):
            return False
        return not any(
            self._forbidden.get(camera_id, frozenset()).intersection(other.all_cameras)
            for camera_id in track.all_cameras
        )

    def _nearest_point_m(
        self, track: Track, event: DetectorEvent, position: Point
    ) -> float | None:
        distances = [
            self._point_distance_m(track, point, event, position)
            for point in track.cameras.values()
        ]
        found = [distance_m for distance_m in distances if distance_m is not None]
        return min(found, default=None)

    def _absorb(self, keep: Track, gone: Track) -> None:
        keep.cameras.update(gone.cameras)
        for camera_id in gone.all_cameras:
            if camera_id not in keep.all_cameras:
                keep.all_cameras.append(camera_id)
        keep.first_ms = min(keep.first_ms, gone.first_ms)
        if gone.last_ms > keep.last_ms:
            keep.last_ms = gone.last_ms
            keep.last_position = gone.last_position
        keep.member_count += gone.member_count
        room = self.rule.max_member_ids - len(keep.member_ids)
        keep.member_ids.extend(gone.member_ids[: max(room, 0)])
        gone.closed = True
        gone.merged_into = keep.global_id

    def _match(
        self, state: SiteState, event: DetectorEvent, position: Point | None
    ) -> Track | None:
        time_ms = event.event_time_ms
        camera_id = event.camera_id
        forbidden = self._forbidden.get(camera_id, frozenset())
        best: tuple[float, str] | None = None
        for track in state.tracks.values():
            if track.closed or time_ms - track.last_ms > self._max_gap_ms:
                continue
            if forbidden.intersection(track.all_cameras):
                continue
            own = track.cameras.get(camera_id)
            if (
                own is not None
                and own.time_ms == time_ms
                and not self._same_frame_near(own, position)
            ):
                continue
            if (
                event.tracker_id is not None
                and own is not None
                and own.tracker_id == event.tracker_id
            ):
                return track
            distance_m = self._distance_m(track, event, position)
            if distance_m is None:
                continue
            if best is None or (distance_m, track.global_id) < best:
                best = (distance_m, track.global_id)
        return None if best is None else state.tracks[best[1]]

    def _same_frame_near(self, own: CameraPoint, position: Point | None) -> bool:
        """Return whether a second box of one frame is close enough to be one object.

        A detector may report one object twice in a frame (two boxes on one
        vehicle); two objects are rarely closer than a car's length.
        """
        if position is None or own.x_m is None or own.y_m is None:
            return False
        separation_m = math.hypot(position[0] - own.x_m, position[1] - own.y_m)
        return separation_m < self.rule.same_frame_merge_m

    def _distance_m(
        self, track: Track, event: DetectorEvent, position: Point | None
    ) -> float | None:
        """Return the gated distance from a track to an event, or ``None``.

        Every recent point of the track counts: a point of the event's own
        camera within ``same_camera_gate_m``, a point of another camera within
        ``cross_camera_gate_m`` (cameras disagree by metres on one object).
        Without positions on either side, zones decide: the same or an
        adjacent zone counts as distance 0.
        """
        time_ms = event.event_time_ms
        best_m: float | None = None
        for camera_id, point in track.cameras.items():
            if time_ms - point.time_ms > self._max_gap_ms:
                continue
            gate_m = (
                self.rule.same_camera_gate_m
                if camera_id == event.camera_id
                else self.rule.cross_camera_gate_m
            )
            # The longer unseen, the further it may have gone (an occlusion).
            gate_m += self.rule.gate_growth_mps * (time_ms - point.time_ms) / 1000
            distance_m = self._point_distance_m(track, point, event, position)
            if distance_m is not None and distance_m <= gate_m:
                best_m = distance_m if best_m is None else min(best_m, distance_m)
        return best_m

    def _point_distance_m(
        self,
        track: Track,
        point: CameraPoint,
        event: DetectorEvent,
        position: Point | None,
    ) -> float | None:
        """Return the distance from a point, moved by the velocity or not.

        The smaller of the two: a velocity from noisy positions overshoots an
        object that stops, and a still point lags one that moves.
        """
        if position is None or point.x_m is None or point.y_m is None:
            return self._zone_distance_m(point.zone_id, event.zone_id)
        dt_s = (event.event_time_ms - point.time_ms) / 1000
        predicted_x = point.x_m + track.velocity_mps[0] * dt_s
        predicted_y = point.y_m + track.velocity_mps[1] * dt_s
        return min(
            math.hypot(position[0] - predicted_x, position[1] - predicted_y),
            math.hypot(position[0] - point.x_m, position[1] - point.y_m),
        )

    def _zone_distance_m(
        self, track_zone: str | None, zone: str | None
    ) -> float | None:
        if track_zone is None or zone is None:
            return None
        if track_zone == zone or zone in self.rule.zone_adjacency.get(track_zone, ()):
            return 0.0
        return None

    def _update(
        self, track: Track, event: DetectorEvent, position: Point | None
    ) -> None:
        time_ms = event.event_time_ms
        camera_id = event.camera_id
        previous = track.cameras.get(camera_id)
        if position is not None and previous is not None and previous.x_m is not None:
            self._update_velocity(track, previous, time_ms, position)

        track.cameras[camera_id] = CameraPoint(
            time_ms=time_ms,
            x_m=None if position is None else position[0],
            y_m=None if position is None else position[1],
            zone_id=event.zone_id,
            tracker_id=event.tracker_id,
        )
        if camera_id not in track.all_cameras:
            track.all_cameras.append(camera_id)
        track.first_ms = min(track.first_ms, time_ms)
        track.last_ms = max(track.last_ms, time_ms)
        if position is not None:
            track.last_position = position
        track.member_count += 1
        if len(track.member_ids) < self.rule.max_member_ids:
            track.member_ids.append(event.event_id)
        self._drop_stale_points(track)

    def _update_velocity(
        self, track: Track, previous: CameraPoint, time_ms: int, position: Point
    ) -> None:
        """Smooth the velocity from one camera's consecutive points.

        Points of one camera share its calibration; mixing cameras would turn
        their offsets into speed.
        """
        dt_s = (time_ms - previous.time_ms) / 1000
        if dt_s < self.rule.min_velocity_dt_s or previous.y_m is None:
            return
        assert previous.x_m is not None  # checked by the caller
        vx = (position[0] - previous.x_m) / dt_s
        vy = (position[1] - previous.y_m) / dt_s
        speed = math.hypot(vx, vy)
        if speed > self.rule.max_speed_mps:
            vx, vy = (
                vx * self.rule.max_speed_mps / speed,
                vy * self.rule.max_speed_mps / speed,
            )
        weight = self.rule.velocity_smoothing
        old_x, old_y = track.velocity_mps
        track.velocity_mps = (
            old_x + weight * (vx - old_x),
            old_y + weight * (vy - old_y),
        )

    def _drop_stale_points(self, track: Track) -> None:
        horizon_ms = track.last_ms - self._max_gap_ms
        for camera_id in [
            name for name, point in track.cameras.items() if point.time_ms < horizon_ms
        ]:
            del track.cameras[camera_id]

    def _close(self, state: SiteState, step: Step, *, flush: bool) -> None:
        for track in state.tracks.values():
            if track.closed:
                continue
            if flush or state.watermark_ms - track.last_ms >= self._close_after_ms:
                track.closed = True
                step.closed.append(track)

    def _forget(self, state: SiteState) -> None:
        """Drop closed tracks and remembered assignments no event can reach.

        Assignments are remembered for ``close_after_s`` behind the watermark,
        so that a redelivered event gets its global id again.
        """
        horizon_ms = state.watermark_ms - self._close_after_ms - self._grace_ms
        for global_id in [
            key
            for key, track in state.tracks.items()
            if track.closed and track.last_ms < horizon_ms
        ]:
            del state.tracks[global_id]
        for event_id in [
            key for key, time_ms in state.recent_ms.items() if time_ms < horizon_ms
        ]:
            del state.recent_ms[event_id]
            del state.recent[event_id]


def _age_key(track: Track) -> tuple[int, str]:
    return track.first_ms, track.global_id


def _assignment(event: DetectorEvent, global_id: str) -> Assignment:
    return Assignment(
        event_id=event.event_id,
        global_id=global_id,
        site_id=event.site_id or "",
        camera_id=event.camera_id,
        event_time_ms=event.event_time_ms,
        event=event,
    )
