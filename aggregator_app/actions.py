"""Cross-detector actions: the pure core, without Kafka or faust.

An action rule (``actions.rules`` in the rules file) joins detector events of
one camera into one :class:`~aggregator_app.schema.ActionEvent`:

* a **pair** rule joins an *anchor* (a face with an identity) and a *partner*
  (a wave) whose times are at most ``within_s`` apart, either first, whose
  boxes overlap by at least ``min_overlap``;
* a **sequence** rule joins a *first* and a *then* event of one tracked thing
  (or one camera) at most ``within_s`` apart, first before then, when no
  *unless* event of that thing lies strictly between them.

Decisions are made by event time, so that they do not depend on the order in
which events arrive. Each partition has a watermark, the highest event time
seen on it. An event older than ``watermark - grace_s`` is *late* and takes
no part. An anchor is decided once the watermark reaches its time +
``within_s`` + ``grace_s`` (every partner it could take has arrived by then),
a *then* event once the watermark reaches its time + ``grace_s``. Anchors are
decided in event-time order (ties by event id), each takes the best partner
that no earlier anchor took: the largest overlap, then the smallest time
gap, then the smallest event id. A *then* event takes the latest *first*
event before it; a *first* event serves one *then* event at most.

Every action is emitted once, with an id made of its rule and its members
(``<rule>:<id>+<id>``). A redelivered event (an id already held) changes
nothing. State survives a restart in a RocksDB table (:mod:`tables.actions`)
through :meth:`ActionMatcher.dump` and :meth:`ActionMatcher.load`; an
action decided by a batch that is read again after a restart (its output
may not have reached the broker) is emitted again, with the same id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aggregator_app.schema import ActionEvent, BBox, DetectorEvent
from rules.config import ActionRules, EventMatch, PairRule, SequenceRule

__all__ = [
    "ActionMatcher",
    "box_overlap",
    "matches",
]

#: Where an event was read: ``topic/partition/offset``.
Positioned = tuple[DetectorEvent, str]


def matches(event: DetectorEvent, match: EventMatch) -> bool:
    """Return whether ``event`` satisfies every field ``match`` gives."""
    if match.detector is not None and event.detector.value != match.detector:
        return False
    if match.label is not None and event.label != match.label:
        return False
    if match.zone_id is not None and event.zone_id != match.zone_id:
        return False
    if match.attribute is not None:
        return event.attributes.get(match.attribute) is not None
    return True


def box_overlap(first: BBox, second: BBox, *, measure: str) -> float:
    """Return the overlap of two boxes: ``iou`` or ``min_ratio`` (over the smaller).

    A box of zero area overlaps nothing.
    """
    width = min(first.x_max, second.x_max) - max(first.x_min, second.x_min)
    height = min(first.y_max, second.y_max) - max(first.y_min, second.y_min)
    if width <= 0 or height <= 0:
        return 0.0

    inter = width * height
    area_first = (first.x_max - first.x_min) * (first.y_max - first.y_min)
    area_second = (second.x_max - second.x_min) * (second.y_max - second.y_min)
    if measure == "iou":
        return inter / (area_first + area_second - inter)
    return inter / min(area_first, area_second)


def _event_overlap(first: DetectorEvent, second: DetectorEvent, measure: str) -> float:
    """Return the overlap of two events' boxes, normalised if both have one."""
    if first.bbox is not None and second.bbox is not None:
        return box_overlap(first.bbox, second.bbox, measure=measure)
    if first.bbox_px is not None and second.bbox_px is not None:
        return box_overlap(first.bbox_px, second.bbox_px, measure=measure)
    return 0.0


def _split_position(position: str) -> tuple[str, tuple[int, int]] | None:
    """Split ``topic/partition/offset[/index]`` into where and how far.

    Returns ``("topic/partition", (offset, index))``, ``None`` if it is not one.
    """
    parts = position.split("/")
    if len(parts) == 3:
        parts.append("0")
    if len(parts) != 4 or not all(part.isdigit() for part in parts[1:]):
        return None
    topic, partition, offset, index = parts
    return f"{topic}/{partition}", (int(offset), int(index))


@dataclass(slots=True)
class _Held:
    """An event that plays a part in some rule, and what was decided of it."""

    event: DetectorEvent
    roles: list[str]
    decided: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)

    @property
    def time_ms(self) -> int:
        return self.event.event_time_ms

    def to_json(self) -> dict[str, object]:
        return {
            "event": self.event.json_text,
            "roles": self.roles,
            "decided": self.decided,
            "used": self.used,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Held:
        return cls(
            event=DetectorEvent.model_validate_json(data["event"]),
            roles=list(data["roles"]),
            decided=list(data["decided"]),
            used=list(data["used"]),
        )


@dataclass(slots=True)
class _Decided:
    """An emitted action, remembered so that a batch read again re-emits it."""

    action_json: str
    end_ms: int
    decided_position: str


@dataclass(slots=True)
class _Camera:
    """What one camera's rules hold."""

    partition: int
    held: dict[str, _Held] = field(default_factory=dict)
    actions: dict[str, _Decided] = field(default_factory=dict)


class ActionMatcher:
    """Holds the events of the action rules per camera and decides actions.

    Not thread-safe; one instance serves the partitions of one worker.
    Feed it the events of a batch with :meth:`observe_batch`; it returns the
    actions to publish. :meth:`take_changes` returns the cameras whose state
    changed, for the table.
    """

    def __init__(self, config: ActionRules) -> None:
        self.config = config
        self._grace_ms = round(config.grace_s * 1000)
        self._horizon_ms = self._grace_ms + round(config.retain_s * 1000)
        self._horizon_ms += max((_reach_ms(rule) for rule in config.rules), default=0)
        self._cameras: dict[str, _Camera] = {}
        self._watermark_ms: dict[int, int] = {}
        self._last_position: dict[int, str] = {}
        self._published_here: set[str] = set()
        self._dirty: set[str] = set()
        self.late_events = 0
        self.redeliveries = 0

    @property
    def enabled(self) -> bool:
        """Return whether any action rule is declared."""
        return bool(self.config.rules)

    def watermark_ms(self, partition: int) -> int | None:
        """Return the highest event time seen on a partition, if any."""
        return self._watermark_ms.get(partition)

    def has_pending(self, partition: int) -> bool:
        """Return whether a partition holds events that wait for a decision."""
        return any(
            self._undecided(held)
            for camera in self._cameras.values()
            if camera.partition == partition
            for held in camera.held.values()
        )

    def observe_batch(
        self,
        events: Sequence[Positioned],
        *,
        partition: int,
        latest_ms: int | None = None,
    ) -> list[ActionEvent]:
        """Take one batch of a partition's events; return the actions to publish.

        ``latest_ms`` caps how far an event moves the watermark (the
        worker's clock plus a small lead): a camera whose clock runs ahead
        cannot decide the others' anchors early or make their events late.

        Steps:
            1. Re-emit the actions decided by records this batch reads again.
            2. Hold each event that plays a part in a rule, unless late or
               already held; advance the watermark.
            3. Decide every anchor and *then* event the watermark allows.
            4. Forget what the watermark has left behind.
        """
        # Step 1.
        emitted = self._read_again(events, partition=partition)

        # Step 2.
        for event, position in events:
            self._observe(event, partition=partition, latest_ms=latest_ms)
            if position:
                self._last_position[partition] = position

        # Step 3.
        emitted.extend(self._decide(partition, force=False))

        # Step 4.
        self._forget(partition)
        return emitted

    def decide_all(self, partition: int) -> list[ActionEvent]:
        """Decide whatever waits on a partition now (it has been idle)."""
        return self._decide(partition, force=True)

    def take_changes(self) -> list[tuple[str, int, dict[str, Any] | None]]:
        """Return ``(camera, partition, state or None)`` of every changed camera."""
        changes = []
        for camera_id in sorted(self._dirty):
            camera = self._cameras.get(camera_id)
            if camera is None:
                continue
            state = self.dump(camera_id) if camera.held or camera.actions else None
            changes.append((camera_id, camera.partition, state))
            if state is None:
                del self._cameras[camera_id]
        self._dirty.clear()
        return changes

    def dump(self, camera_id: str) -> dict[str, Any]:
        """Return a camera's state as a JSON-ready dict (the table's value)."""
        camera = self._cameras[camera_id]
        return {
            "partition": camera.partition,
            "watermark_ms": self._watermark_ms.get(camera.partition, 0),
            "held": [held.to_json() for held in camera.held.values()],
            "actions": {
                action_id: [
                    decided.action_json,
                    decided.end_ms,
                    decided.decided_position,
                ]
                for action_id, decided in camera.actions.items()
            },
        }

    def load(self, camera_id: str, state: dict[str, Any]) -> None:
        """Take back a camera's state from :meth:`dump` (after a restart)."""
        partition = int(state["partition"])
        camera = _Camera(partition=partition)
        for item in state["held"]:
            held = _Held.from_json(item)
            camera.held[held.event.event_id] = held
        for action_id, (action_json, end_ms, position) in state["actions"].items():
            camera.actions[action_id] = _Decided(action_json, end_ms, position)
        self._cameras[camera_id] = camera

        watermark_ms = int(state["watermark_ms"])
        if watermark_ms > self._watermark_ms.get(partition, -1):
            self._watermark_ms[partition] = watermark_ms

    def reset(self) -> None:
        """Forget everything held in memory (the partitions were revoked)."""
        self._cameras.clear()
        self._watermark_ms.clear()
        self._last_position.clear()
        self._dirty.clear()

    # Holding events.

    def _roles(self, event: DetectorEvent) -> list[str]:
        roles = []
        for rule in self.config.rules:
            parts: list[tuple[str, EventMatch]]
            if isinstance(rule, PairRule):
                parts = [("anchor", rule.anchor), ("partner", rule.partner)]
            else:
                parts = [("first", rule.first), ("then", rule.then)]
                if rule.unless is not None:
                    parts.append(("unless", rule.unless))
            roles += [f"{rule.id}/{role}" for role, m in parts if matches(event, m)]
        return roles

    def _observe(
        self, event: DetectorEvent, *, partition: int, latest_ms: int | None
    ) -> None:
        watermark_ms = self._watermark_ms.get(partition)
        time_ms = event.event_time_ms
        advance_ms = time_ms if latest_ms is None else min(time_ms, latest_ms)
        if watermark_ms is None or advance_ms > watermark_ms:
            self._watermark_ms[partition] = advance_ms

        roles = self._roles(event)
        if not roles:
            return
        camera = self._cameras.setdefault(event.camera_id, _Camera(partition))
        if event.event_id in camera.held:
            self.redeliveries += 1
            return
        if (
            watermark_ms is not None
            and event.event_time_ms < watermark_ms - self._grace_ms
        ):
            self.late_events += 1
            return

        camera.held[event.event_id] = _Held(event=event, roles=roles)
        self._dirty.add(event.camera_id)

    def _undecided(self, held: _Held) -> bool:
        for role in held.roles:
            rule_id, _, part = role.partition("/")
            if part in ("anchor", "then") and rule_id not in held.decided:
                return True
        return False

    # Deciding.

    def _decide(self, partition: int, *, force: bool) -> list[ActionEvent]:
        watermark_ms = self._watermark_ms.get(partition)
        if watermark_ms is None:
            return []
        emitted: list[ActionEvent] = []
        for camera_id, camera in self._cameras.items():
            if camera.partition != partition:
                continue
            for rule in self.config.rules:
                due_ms = None if force else watermark_ms - self._grace_ms
                if isinstance(rule, PairRule):
                    found = self._decide_pairs(camera, rule, due_ms)
                else:
                    found = self._decide_sequences(camera, rule, due_ms)
                if found:
                    self._dirty.add(camera_id)
                emitted += [self._remember(camera, a, partition) for a in found]
        return emitted

    def _due(
        self,
        camera: _Camera,
        rule_id: str,
        role: str,
        due_ms: int | None,
        reach_ms: int,
    ) -> list[_Held]:
        """Return the undecided events of a role whose decision time has come."""
        tag = f"{rule_id}/{role}"
        due = [
            held
            for held in camera.held.values()
            if tag in held.roles
            and rule_id not in held.decided
            and (due_ms is None or held.time_ms + reach_ms < due_ms)
        ]
        due.sort(key=lambda held: (held.time_ms, held.event.event_id))
        return due

    def _decide_pairs(
        self, camera: _Camera, rule: PairRule, due_ms: int | None
    ) -> list[ActionEvent]:
        within_ms = round(rule.within_s * 1000)
        partners = [h for h in camera.held.values() if f"{rule.id}/partner" in h.roles]
        found = []
        for anchor in self._due(camera, rule.id, "anchor", due_ms, within_ms):
            anchor.decided.append(rule.id)
            best = _best_partner(anchor, partners, rule, within_ms)
            if best is None:
                continue
            partner, overlap = best
            partner.used.append(rule.id)
            found.append(_action(rule, [anchor.event, partner.event], overlap))
        return found

    def _decide_sequences(
        self, camera: _Camera, rule: SequenceRule, due_ms: int | None
    ) -> list[ActionEvent]:
        within_ms = round(rule.within_s * 1000)
        found = []
        for then in self._due(camera, rule.id, "then", due_ms, 0):
            then.decided.append(rule.id)
            first = _latest_first(then, camera, rule, within_ms)
            if first is None or rule.id in first.used:
                continue
            if _unless_between(first, then, camera, rule):
                continue
            first.used.append(rule.id)
            found.append(_action(rule, [first.event, then.event], None))
        return found

    def _remember(
        self, camera: _Camera, action: ActionEvent, partition: int
    ) -> ActionEvent:
        camera.actions[action.aggregated_id] = _Decided(
            action_json=action.json_text,
            end_ms=action.end_time_ms,
            decided_position=self._last_position.get(partition, ""),
        )
        self._published_here.add(action.aggregated_id)
        return action

    # Restarts and forgetting.

    def _read_again(
        self, events: Sequence[Positioned], *, partition: int
    ) -> list[ActionEvent]:
        """Return the actions decided at or after a position this batch reads.

        Only actions this process has not published itself: after a restart,
        the records from the last committed offset on are read again, and an
        action decided by one of them may never have reached the broker.
        """
        first_read: dict[str, tuple[int, int]] = {}
        for _event, position in events:
            split = _split_position(position)
            if split is not None and split[0] not in first_read:
                first_read[split[0]] = split[1]
        if not first_read:
            return []

        again = []
        for camera in self._cameras.values():
            if camera.partition != partition:
                continue
            for action_id, decided in camera.actions.items():
                if action_id in self._published_here:
                    continue
                split = _split_position(decided.decided_position)
                read_from = first_read.get(split[0]) if split is not None else None
                if (
                    split is not None
                    and read_from is not None
                    and split[1] >= read_from
                ):
                    self._published_here.add(action_id)
                    again.append(ActionEvent.model_validate_json(decided.action_json))
        return again

    def _forget(self, partition: int) -> None:
        watermark_ms = self._watermark_ms.get(partition)
        if watermark_ms is None:
            return
        before_ms = watermark_ms - self._horizon_ms
        for camera_id, camera in self._cameras.items():
            if camera.partition != partition:
                continue
            old = [i for i, held in camera.held.items() if held.time_ms < before_ms]
            done = [i for i, d in camera.actions.items() if d.end_ms < before_ms]
            for event_id in old:
                del camera.held[event_id]
            for action_id in done:
                del camera.actions[action_id]
                self._published_here.discard(action_id)
            if old or done:
                self._dirty.add(camera_id)


def _reach_ms(rule: PairRule | SequenceRule) -> int:
    """Return how long after an event's time it may still join an action.

    A partner may serve an anchor up to ``within_s`` after it, and that
    anchor waits ``within_s`` more for its decision.
    """
    within_ms = round(rule.within_s * 1000)
    return 2 * within_ms if isinstance(rule, PairRule) else within_ms


def _best_partner(
    anchor: _Held, partners: Iterable[_Held], rule: PairRule, within_ms: int
) -> tuple[_Held, float] | None:
    """Return the free partner an anchor takes, with its overlap, if any."""
    best: tuple[float, int, str] | None = None
    chosen: tuple[_Held, float] | None = None
    for partner in partners:
        if rule.id in partner.used or partner.event.event_id == anchor.event.event_id:
            continue
        gap_ms = abs(partner.time_ms - anchor.time_ms)
        if gap_ms > within_ms:
            continue
        overlap = _event_overlap(anchor.event, partner.event, rule.overlap)
        if overlap < rule.min_overlap:
            continue
        rank = (-overlap, gap_ms, partner.event.event_id)
        if best is None or rank < best:
            best, chosen = rank, (partner, overlap)
    return chosen


def _same_thing(
    first: DetectorEvent, second: DetectorEvent, rule: SequenceRule
) -> bool:
    if rule.same == "camera":
        return True
    return first.tracker_id is not None and first.tracker_id == second.tracker_id


def _latest_first(
    then: _Held, camera: _Camera, rule: SequenceRule, within_ms: int
) -> _Held | None:
    """Return the latest *first* event of the same thing before ``then``."""
    tag = f"{rule.id}/first"
    candidates = [
        held
        for held in camera.held.values()
        if tag in held.roles
        and held.event.event_id != then.event.event_id
        and 0 <= then.time_ms - held.time_ms <= within_ms
        and _same_thing(held.event, then.event, rule)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda held: (held.time_ms, held.event.event_id))


def _unless_between(
    first: _Held, then: _Held, camera: _Camera, rule: SequenceRule
) -> bool:
    """Return whether an *unless* event of the same thing lies strictly between."""
    tag = f"{rule.id}/unless"
    return any(
        tag in held.roles
        and first.time_ms < held.time_ms < then.time_ms
        and _same_thing(held.event, then.event, rule)
        for held in camera.held.values()
    )


def _action(
    rule: PairRule | SequenceRule, members: list[DetectorEvent], overlap: float | None
) -> ActionEvent:
    """Build the action of a rule from its members, in the rule's order."""
    times = [member.event_time_ms for member in members]
    member_ids = "+".join(member.event_id for member in members)
    return ActionEvent(
        aggregated_id=f"{rule.id}:{member_ids}",
        rule_id=rule.id,
        kind=rule.kind,
        action=rule.action,
        camera_id=members[0].camera_id,
        site_id=members[0].site_id,
        start_time_ms=min(times),
        end_time_ms=max(times),
        overlap=None if overlap is None else round(overlap, 4),
        members=members,
    )
