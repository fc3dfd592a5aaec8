"""Precision and recall of the pair rule on a labelled set built from real tracks.

No public data set labels "a recognised face and a wave of the same person",
so this module builds one from the human ground truth of MOTChallenge 2015
TUD-Stadtmitte (``gt.txt``: 10 people, 179 frames at 25 fps, pixel boxes;
read from ``../shared/data``, never committed). How the set is made is
described exactly in ``docs/event-patterns.md`` ("A labelled set for
actions"); in short, per scene (a camera of its own) and per person:

* a **face** at a random frame of the person's track, box = the head part of
  the person's box, with an ``identity`` attribute;
* a **wave** of the same person at another frame of the track, box = the
  person's box at that frame: within 1.9 s of the face (must pair) or, for
  about a third of the people, more than 2.1 s away (must not);
* **distractor waves** of other people whose boxes overlap the face's
  person or stand near it, within 1.5 s of the face;
* sometimes a **point** gesture of the same person (not a wave: must not pair).

The truth: a face must become an action with a wave of the same person at
most 2 s away, if it has one. ``aggregator-evaluate-actions`` runs the set
through the pure core in-process and, with ``--kafka``, through a running
worker, and prints precision and recall.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from aggregator_app.actions import ActionMatcher, Positioned
from aggregator_app.exceptions import ConfigError
from aggregator_app.ingest import REPLAY_HEADER
from aggregator_app.schema import ActionEvent, DetectorEvent
from rules.config import ActionRules, PairRule, RulesConfig, load_rules

__all__ = [
    "LabelledSet",
    "Score",
    "build_labelled_set",
    "load_tracks",
    "main",
    "run_in_process",
    "score",
]

DEFAULT_GT = (
    Path(__file__).resolve().parents[1]
    / "../shared/data/mot15-tud/TUD-Stadtmitte/gt.txt"
)
FRAME_WIDTH_PX = 640
FRAME_HEIGHT_PX = 480
FRAMES_PER_S = 25
SCENE_SPACING_MS = 8000
PAIR_LIMIT_MS = 2000
_MUST_PAIR_MAX_MS = 1900
_MUST_NOT_MIN_MS = 2100
_DISTRACTOR_MAX_MS = 1500
_MAX_DISTRACTORS = 2

#: One ground-truth box: frame, left, top, width, height (pixels).
Box = tuple[int, float, float, float, float]


@dataclass
class LabelledSet:
    """Events (time order) and, per face, the waves it may pair with."""

    events: list[DetectorEvent]
    eligible: dict[str, set[str]]
    person_of: dict[str, int] = field(default_factory=dict)

    @property
    def faces(self) -> int:
        return len(self.eligible)

    @property
    def must_pair(self) -> int:
        return sum(1 for waves in self.eligible.values() if waves)


@dataclass(frozen=True)
class Score:
    """How the actions found compare with the truth."""

    actions: int
    correct: int
    must_pair: int
    faces_paired: int

    @property
    def precision(self) -> float:
        return self.correct / self.actions if self.actions else 1.0

    @property
    def recall(self) -> float:
        return self.faces_paired / self.must_pair if self.must_pair else 1.0

    def line(self, what: str) -> str:
        return (
            f"{what}: precision={self.precision:.3f} recall={self.recall:.3f} "
            f"actions={self.actions} correct={self.correct} "
            f"must_pair={self.must_pair} paired={self.faces_paired}"
        )


def load_tracks(gt_path: Path) -> dict[int, list[Box]]:
    """Read a MOTChallenge ``gt.txt``: per track id, its boxes in frame order."""
    tracks: dict[int, list[Box]] = {}
    for line in gt_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        frame, track, left, top, width, height = line.split(",")[:6]
        box = (int(frame), float(left), float(top), float(width), float(height))
        tracks.setdefault(int(track), []).append(box)
    for boxes in tracks.values():
        boxes.sort()
    return tracks


def _frame_ms(frame: int) -> int:
    return round((frame - 1) * 1000 / FRAMES_PER_S)


def _normalised(
    left: float, top: float, right: float, bottom: float
) -> dict[str, float]:
    def clamp(value: float, size: int) -> float:
        return round(min(max(value / size, 0.0), 1.0), 5)

    return {
        "x_min": clamp(left, FRAME_WIDTH_PX),
        "y_min": clamp(top, FRAME_HEIGHT_PX),
        "x_max": clamp(right, FRAME_WIDTH_PX),
        "y_max": clamp(bottom, FRAME_HEIGHT_PX),
    }


def _head_box(box: Box) -> dict[str, float]:
    """Return the head part of a person's box: middle 40 % of the width, top 18 %."""
    _frame, left, top, width, height = box
    return _normalised(left + 0.3 * width, top, left + 0.7 * width, top + 0.18 * height)


def _person_box(box: Box) -> dict[str, float]:
    _frame, left, top, width, height = box
    return _normalised(left, top, left + width, top + height)


def _near(first: Box, second: Box) -> bool:
    """Return whether two people's boxes overlap or their centres are close.

    Close: horizontal centre distance under 1.5 times the wider box's width.
    """
    _f1, left1, top1, width1, height1 = first
    _f2, left2, top2, width2, height2 = second
    overlap_x = min(left1 + width1, left2 + width2) - max(left1, left2)
    overlap_y = min(top1 + height1, top2 + height2) - max(top1, top2)
    if overlap_x > 0 and overlap_y > 0:
        return True
    centre_gap = abs((left1 + width1 / 2) - (left2 + width2 / 2))
    return centre_gap < 1.5 * max(width1, width2)


@dataclass
class _Scene:
    """Builds the events of one scene (one camera)."""

    index: int
    camera_id: str
    start_ms: int
    rng: random.Random
    events: list[DetectorEvent] = field(default_factory=list)

    def add(
        self, event_id: str, detector: str, label: str, box: Box, **extra: object
    ) -> str:
        full_id = f"s{self.index:02d}-{event_id}"
        bbox = _head_box(box) if detector == "face" else _person_box(box)
        fields: dict[str, object] = {
            "event_id": full_id,
            "detector": detector,
            "source": "tud-actions",
            "camera_id": self.camera_id,
            "event_time_ms": self.start_ms + _frame_ms(box[0]),
            "label": label,
            "confidence": round(self.rng.uniform(0.6, 0.99), 3),
            "bbox": bbox,
            **extra,
        }
        self.events.append(DetectorEvent.model_validate(fields))
        return full_id


def _frames_at(boxes: list[Box], frame: int, lo_ms: int, hi_ms: int) -> list[Box]:
    """Return the boxes whose time distance from ``frame`` is in ``[lo, hi]`` ms."""
    at_ms = _frame_ms(frame)
    return [b for b in boxes if lo_ms <= abs(_frame_ms(b[0]) - at_ms) <= hi_ms]


def build_labelled_set(
    tracks: dict[int, list[Box]], *, scenes: int, seed: int, base_ms: int
) -> LabelledSet:
    """Build the labelled set (see the module docstring and docs)."""
    rng = random.Random(seed)
    labelled = LabelledSet(events=[], eligible={})
    waves: list[tuple[str, int, int]] = []  # (wave id, person, time ms)
    faces: list[tuple[str, int, int]] = []

    for index in range(scenes):
        scene = _Scene(
            index=index,
            camera_id=f"TUD-Stadtmitte-s{index:02d}",
            start_ms=base_ms + index * SCENE_SPACING_MS,
            rng=rng,
        )
        for person, boxes in sorted(tracks.items()):
            face_box = rng.choice(boxes)
            face_id = scene.add(
                f"f{person}",
                "face",
                "face",
                face_box,
                attributes={"identity": f"p{person}"},
            )
            faces.append((face_id, person, scene.events[-1].event_time_ms))

            # The person's own wave: must pair, or too far in time.
            too_far = _frames_at(boxes, face_box[0], _MUST_NOT_MIN_MS, 10**9)
            if too_far and rng.random() < 0.35:
                wave_box = rng.choice(too_far)
            else:
                wave_box = rng.choice(
                    _frames_at(boxes, face_box[0], 0, _MUST_PAIR_MAX_MS)
                )
            wave_id = scene.add(f"w{person}", "gesture", "wave", wave_box)
            waves.append((wave_id, person, scene.events[-1].event_time_ms))

            # Other people near the face, waving.
            others = []
            for other, other_boxes in sorted(tracks.items()):
                if other == person:
                    continue
                near = [
                    b
                    for b in _frames_at(other_boxes, face_box[0], 0, _DISTRACTOR_MAX_MS)
                    if _near(b, face_box)
                ]
                if near:
                    others.append((other, rng.choice(near)))
            rng.shuffle(others)
            for other, box in others[:_MAX_DISTRACTORS]:
                distractor_id = scene.add(f"d{person}-{other}", "gesture", "wave", box)
                waves.append((distractor_id, other, scene.events[-1].event_time_ms))

            # Sometimes the person points instead: a gesture that is no wave.
            if rng.random() < 0.3:
                point_box = rng.choice(
                    _frames_at(boxes, face_box[0], 0, _MUST_PAIR_MAX_MS)
                )
                scene.add(f"p{person}", "gesture", "point", point_box)

        labelled.events += scene.events

    for face_id, person, face_ms in faces:
        labelled.eligible[face_id] = {
            wave_id
            for wave_id, wave_person, wave_ms in waves
            if wave_person == person
            and wave_id.split("-")[0] == face_id.split("-")[0]
            and abs(wave_ms - face_ms) <= PAIR_LIMIT_MS
        }
    labelled.events.sort(key=lambda event: (event.event_time_ms, event.event_id))
    return labelled


def score(actions: Sequence[ActionEvent], labelled: LabelledSet, rule_id: str) -> Score:
    """Compare the actions of ``rule_id`` with the truth of the labelled set."""
    mine = {a.aggregated_id: a for a in actions if a.rule_id == rule_id}
    correct = 0
    paired: set[str] = set()
    for action in mine.values():
        face_id, wave_id = (member.event_id for member in action.members)
        if wave_id in labelled.eligible.get(face_id, set()):
            correct += 1
            paired.add(face_id)
    return Score(
        actions=len(mine),
        correct=correct,
        must_pair=labelled.must_pair,
        faces_paired=len(paired),
    )


def run_in_process(
    labelled: LabelledSet, config: ActionRules, *, jitter_ms: int, seed: int
) -> list[ActionEvent]:
    """Run the events through the pure core, each up to ``jitter_ms`` late."""
    rng = random.Random(seed)
    arrival = sorted(
        labelled.events, key=lambda e: e.event_time_ms + rng.randrange(jitter_ms + 1)
    )
    matcher = ActionMatcher(config)
    actions: list[ActionEvent] = []
    for offset, event in enumerate(arrival):
        batch: list[Positioned] = [(event, f"eval/0/{offset}")]
        actions += matcher.observe_batch(batch, partition=0)
    actions += matcher.decide_all(0)
    return actions


async def _run_over_kafka(
    labelled: LabelledSet,
    *,
    bootstrap: str,
    topic: str,
    aggregated: str,
    timeout_s: float,
) -> list[ActionEvent]:
    """Send the events to a worker's unified topic; collect its actions.

    Waits until every face is decided (each face leads to at most one action,
    and a worker decides the last ones once a partition has been idle), or
    until ``timeout_s`` passes, whichever comes first: it stops once no
    new action arrived for 15 s after the first one.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        aggregated,
        bootstrap_servers=bootstrap,
        group_id=f"evaluate-actions-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    await consumer.getmany(timeout_ms=2000)  # take the partitions, at their end
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for event in labelled.events:
            await producer.send(
                topic,
                value=event.json_text.encode(),
                key=event.camera_id.encode(),
                timestamp_ms=event.event_time_ms,
                headers=[(REPLAY_HEADER, b"1")],
            )
        await producer.flush()
    finally:
        await producer.stop()

    actions: dict[str, ActionEvent] = {}
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    data = orjson.loads(record.value or b"{}")
                    if data.get("type") == "action":
                        action = ActionEvent.model_validate(data)
                        if action.aggregated_id not in actions:
                            actions[action.aggregated_id] = action
                            last_new = time.monotonic()
            if actions and time.monotonic() - last_new > 15:
                break
    finally:
        await consumer.stop()
    return list(actions.values())


def _with_overlap(
    config: ActionRules, rule: PairRule, measure: str, min_overlap: float
) -> ActionRules:
    """Return the action rules with another overlap measure and threshold."""
    changed = rule.model_copy(update={"overlap": measure, "min_overlap": min_overlap})
    rules = [changed if r.id == rule.id else r for r in config.rules]
    return config.model_copy(update={"rules": rules})


def _unified_topic(rules: RulesConfig) -> str:
    for source in rules.sources:
        if source.adapter == "unified":
            return source.topic
    raise ConfigError("the rules file has no source with the unified adapter")


def _pair_rule(config: ActionRules) -> PairRule:
    for rule in config.rules:
        if isinstance(rule, PairRule) and rule.anchor.detector == "face":
            return rule
    raise ConfigError("the rules file has no pair rule with a face anchor")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the labelled set, run it, print precision and recall."""
    parser = argparse.ArgumentParser(
        prog="aggregator-evaluate-actions", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--gt", type=Path, default=Path(os.environ.get("TUD_GT", DEFAULT_GT))
    )
    parser.add_argument(
        "--rules",
        default=os.environ.get("AGGREGATOR_RULES", "config/aggregation-rules.yml"),
    )
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--jitter-ms", type=int, default=None, help="default: the rules' grace"
    )
    parser.add_argument(
        "--kafka", metavar="BOOTSTRAP", help="also run through a worker"
    )
    parser.add_argument(
        "--topic-prefix", default=os.environ.get("AGGREGATOR_TOPIC_PREFIX", "")
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also try other overlap thresholds"
    )
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)

    if not args.gt.exists():
        print(f"no ground truth at {args.gt}: pass --gt or TUD_GT", file=sys.stderr)
        return 2
    rules = load_rules(args.rules).with_topic_prefix(args.topic_prefix)
    config = rules.actions
    rule = _pair_rule(config)
    tracks = load_tracks(args.gt)
    base_ms = (int(time.time()) - 60 - args.scenes * SCENE_SPACING_MS // 1000) * 1000
    labelled = build_labelled_set(
        tracks, scenes=args.scenes, seed=args.seed, base_ms=base_ms
    )
    print(
        f"labelled set: gt={args.gt.name} people={len(tracks)} scenes={args.scenes} "
        f"seed={args.seed} events={len(labelled.events)} faces={labelled.faces} "
        f"must_pair={labelled.must_pair}"
    )

    jitter_ms = (
        round(config.grace_s * 1000) if args.jitter_ms is None else args.jitter_ms
    )
    for jitter in sorted({0, jitter_ms}):
        actions = run_in_process(labelled, config, jitter_ms=jitter, seed=args.seed)
        print(
            score(actions, labelled, rule.id).line(
                f"in-process (late up to {jitter} ms)"
            )
        )

    if args.sweep:
        for measure in ("min_ratio", "iou"):
            for min_overlap in (0.1, 0.3, 0.5, 0.7, 0.9):
                swept = _with_overlap(config, rule, measure, min_overlap)
                actions = run_in_process(labelled, swept, jitter_ms=0, seed=args.seed)
                what = f"in-process overlap={measure} min_overlap={min_overlap}"
                print(score(actions, labelled, rule.id).line(what))

    if args.kafka:
        topic = _unified_topic(rules)
        aggregated = rules.aggregated_topic
        actions = asyncio.run(
            _run_over_kafka(
                labelled,
                bootstrap=args.kafka,
                topic=topic,
                aggregated=aggregated,
                timeout_s=args.timeout_s,
            )
        )
        print(score(actions, labelled, rule.id).line(f"worker over Kafka ({topic})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
