"""The action core: a pair gives one action in either order, none beyond the time
limit or without overlap; a sequence respects "no C in between"; redelivery,
out-of-order arrival within grace and a restart change nothing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregator_app.actions import ActionMatcher, Positioned, box_overlap
from aggregator_app.schema import ActionEvent, BBox, DetectorEvent
from rules.config import ActionRules, load_rules

BASE_MS = 1_700_000_000_000
GRACE_MS = 5000
TOPIC = "detections.unified/0"

PAIR = {
    "kind": "pair",
    "id": "greeting",
    "action": "greeting",
    "anchor": {"detector": "face", "attribute": "identity"},
    "partner": {"detector": "gesture", "label": "wave"},
    "within_s": 2,
    "overlap": "min_ratio",
    "min_overlap": 0.5,
}
CONFIG = ActionRules.model_validate(
    {
        "grace_s": GRACE_MS / 1000,
        "retain_s": 60,
        "rules": [
            PAIR,
            {
                "kind": "sequence",
                "id": "x-then-y",
                "action": "crossed",
                "first": {"detector": "person", "zone_id": "X"},
                "then": {"detector": "person", "zone_id": "Y"},
                "unless": {"label": "exit"},
                "within_s": 10,
            },
        ],
    }
)

Box = tuple[float, float, float, float]
PERSON_BOX: Box = (0.40, 0.20, 0.50, 0.60)
FACE_BOX: Box = (0.43, 0.20, 0.47, 0.28)
FAR_BOX: Box = (0.70, 0.20, 0.80, 0.60)


def event(
    event_id: str,
    *,
    detector: str,
    label: str,
    time_ms: int,
    box: Box | None = None,
    zone_id: str | None = None,
    tracker_id: str | None = None,
    identity: str | None = None,
) -> DetectorEvent:
    fields: dict[str, object] = {
        "event_id": event_id,
        "detector": detector,
        "source": "test",
        "camera_id": "cam-1",
        "event_time_ms": time_ms,
        "label": label,
        "zone_id": zone_id,
        "tracker_id": tracker_id,
    }
    if box is not None:
        fields["bbox"] = dict(
            zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True)
        )
    if identity is not None:
        fields["attributes"] = {"identity": identity}
    return DetectorEvent.model_validate(fields)


def bbox(box: Box) -> BBox:
    return BBox.model_validate(
        dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True))
    )


def face(event_id: str, time_ms: int, box: Box = FACE_BOX) -> DetectorEvent:
    return event(
        event_id, detector="face", label="face", time_ms=time_ms, box=box, identity="a"
    )


def wave(event_id: str, time_ms: int, box: Box = PERSON_BOX) -> DetectorEvent:
    return event(event_id, detector="gesture", label="wave", time_ms=time_ms, box=box)


def person(
    event_id: str, time_ms: int, *, zone_id: str | None, label: str = "person"
) -> DetectorEvent:
    return event(
        event_id,
        detector="person",
        label=label,
        time_ms=time_ms,
        zone_id=zone_id,
        tracker_id="7",
    )


def clock(time_ms: int) -> DetectorEvent:
    """An event of no rule that moves the watermark on."""
    return event(f"clock-{time_ms}", detector="vehicle", label="car", time_ms=time_ms)


def run(
    events: list[DetectorEvent],
    *,
    batch_size: int = 1,
    matcher: ActionMatcher | None = None,
) -> list[ActionEvent]:
    """Feed events in this order, in batches, then a clock far ahead; return actions."""
    matcher = matcher or ActionMatcher(CONFIG)
    positioned: list[Positioned] = [
        (item, f"{TOPIC}/{offset}") for offset, item in enumerate(events)
    ]
    last_ms = max(item.event_time_ms for item in events)
    positioned.append((clock(last_ms + 60_000), f"{TOPIC}/{len(events)}"))

    actions: list[ActionEvent] = []
    for start in range(0, len(positioned), batch_size):
        batch = positioned[start : start + batch_size]
        actions += matcher.observe_batch(batch, partition=0)
    return actions


def ids(actions: list[ActionEvent]) -> list[str]:
    return sorted(action.aggregated_id for action in actions)


# Pairs.


@settings(max_examples=60, deadline=None)
@given(
    gap_ms=st.integers(min_value=-2000, max_value=2000),
    wave_first=st.booleans(),
    batch_size=st.integers(min_value=1, max_value=3),
)
def test_face_and_wave_in_either_order_give_one_action(
    gap_ms: int, wave_first: bool, batch_size: int
) -> None:
    pair = [face("f", BASE_MS), wave("w", BASE_MS + gap_ms)]
    if wave_first:
        pair.reverse()

    actions = run(pair, batch_size=batch_size)

    assert ids(actions) == ["greeting:f+w"]
    assert [m.event_id for m in actions[0].members] == ["f", "w"]
    assert actions[0].start_time_ms == min(BASE_MS, BASE_MS + gap_ms)


@settings(max_examples=40, deadline=None)
@given(
    gap_ms=st.integers(min_value=2001, max_value=30_000), sign=st.sampled_from([-1, 1])
)
def test_no_action_beyond_the_time_limit(gap_ms: int, sign: int) -> None:
    assert run([face("f", BASE_MS), wave("w", BASE_MS + sign * gap_ms)]) == []


@settings(max_examples=40, deadline=None)
@given(shift=st.floats(min_value=0.06, max_value=0.5), gap_ms=st.integers(-2000, 2000))
def test_no_action_without_overlap(shift: float, gap_ms: int) -> None:
    x_min, y_min, x_max, y_max = FACE_BOX
    moved = (x_min + shift, y_min, x_max + shift, y_max)
    assert box_overlap(bbox(moved), bbox(PERSON_BOX), measure="min_ratio") < 0.5

    assert run([face("f", BASE_MS, box=moved), wave("w", BASE_MS + gap_ms)]) == []


def test_face_without_identity_is_no_anchor() -> None:
    anonymous = event("f", detector="face", label="face", time_ms=BASE_MS, box=FACE_BOX)
    assert run([anonymous, wave("w", BASE_MS)]) == []


def test_a_face_takes_the_wave_of_largest_overlap_then_nearest_time() -> None:
    half_box = (0.45, 0.20, 0.55, 0.60)  # covers half of the face
    events = [
        face("f", BASE_MS),
        wave("w-near-half", BASE_MS + 100, box=half_box),
        wave("w-far-full", BASE_MS + 1500),
        wave("w-near-full", BASE_MS + 900),
    ]
    assert ids(run(events)) == ["greeting:f+w-near-full"]


def test_a_wave_serves_one_face_the_earlier_one() -> None:
    events = [
        wave("w", BASE_MS + 1000),
        face("f2", BASE_MS + 1500),
        face("f1", BASE_MS),
    ]
    assert ids(run(events)) == ["greeting:f1+w"]


# Sequences.


@settings(max_examples=60, deadline=None)
@given(
    exit_at_ms=st.integers(min_value=-5000, max_value=15_000),
    gap_ms=st.integers(min_value=0, max_value=10_000),
    jitter_seed=st.integers(0, 1000),
)
def test_sequence_respects_no_exit_in_between(
    exit_at_ms: int, gap_ms: int, jitter_seed: int
) -> None:
    events = [
        person("x", BASE_MS, zone_id="X"),
        person("y", BASE_MS + gap_ms, zone_id="Y"),
        person("exit", BASE_MS + exit_at_ms, zone_id=None, label="exit"),
    ]
    rng = random.Random(jitter_seed)
    # Out of order, each within the grace period.
    events.sort(key=lambda e: e.event_time_ms + rng.randrange(GRACE_MS))

    between = 0 < exit_at_ms < gap_ms
    assert ids(run(events)) == ([] if between else ["x-then-y:x+y"])


def test_sequence_needs_the_order_and_the_time_limit() -> None:
    assert (
        run([person("y", BASE_MS, zone_id="Y"), person("x", BASE_MS + 1, zone_id="X")])
        == []
    )
    assert (
        run(
            [
                person("x", BASE_MS, zone_id="X"),
                person("y", BASE_MS + 10_001, zone_id="Y"),
            ]
        )
        == []
    )


def test_sequence_takes_the_latest_first_once() -> None:
    events = [
        person("x1", BASE_MS, zone_id="X"),
        person("x2", BASE_MS + 1000, zone_id="X"),
        person("y1", BASE_MS + 2000, zone_id="Y"),
        person("y2", BASE_MS + 2500, zone_id="Y"),
    ]
    assert ids(run(events)) == ["x-then-y:x2+y1"]


# Delivery: redelivery, out of order within grace, restart.


def scene(count: int, seed: int) -> list[DetectorEvent]:
    """Faces, waves (some overlapping, some not) and zone visits, in time order."""
    rng = random.Random(seed)
    events = []
    for index in range(count):
        time_ms = BASE_MS + index * 400 + rng.randrange(400)
        kind = rng.randrange(5)
        box = PERSON_BOX if rng.random() < 0.7 else FAR_BOX
        if kind == 0:
            events.append(face(f"f{index}", time_ms))
        elif kind == 1:
            events.append(wave(f"w{index}", time_ms, box=box))
        elif kind == 2:
            events.append(person(f"x{index}", time_ms, zone_id="X"))
        elif kind == 3:
            events.append(person(f"y{index}", time_ms, zone_id="Y"))
        else:
            events.append(person(f"e{index}", time_ms, zone_id=None, label="exit"))
    return events


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    redelivered=st.lists(st.integers(0, 39), max_size=15),
    batch_size=st.integers(1, 7),
)
def test_redelivered_events_emit_nothing_more(
    seed: int, redelivered: list[int], batch_size: int
) -> None:
    events = scene(40, seed)
    with_copies = list(events)
    for index in redelivered:
        with_copies.insert(min(index + 3, len(with_copies)), events[index])

    once = run(events, batch_size=batch_size)
    again = run(with_copies, batch_size=batch_size)

    assert ids(again) == ids(once)
    assert len(set(ids(again))) == len(again)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), batch_size=st.integers(1, 7))
def test_arrival_order_within_grace_changes_nothing(seed: int, batch_size: int) -> None:
    events = scene(40, seed)
    rng = random.Random(seed)
    # Each event arrives up to the grace period later than its own time.
    arrival = sorted(events, key=lambda e: e.event_time_ms + rng.randrange(GRACE_MS))

    assert ids(run(arrival, batch_size=batch_size)) == ids(run(events))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(1, 39))
def test_restart_from_the_table_re_emits_only_what_it_reads_again(
    seed: int, cut: int
) -> None:
    events = scene(40, seed) + [clock(BASE_MS + 100_000)]
    positioned = [(item, f"{TOPIC}/{offset}") for offset, item in enumerate(events)]
    expected = ids(run(events[:-1]))

    first = ActionMatcher(CONFIG)
    before = first.observe_batch(positioned[:cut], partition=0)
    states = {camera: state for camera, _p, state in first.take_changes() if state}

    # A new process: state from the table, records from a committed offset on.
    committed = random.Random(seed).randrange(cut + 1)
    second = ActionMatcher(CONFIG)
    for camera, state in states.items():
        second.load(camera, state)
    after = second.observe_batch(positioned[committed:], partition=0)

    assert sorted(set(ids(before) + ids(after))) == expected
    # The first process decided its actions at offset cut - 1: read again
    # from there or earlier, they are published again, with the same ids.
    again = set(ids(before)) & set(ids(after))
    assert again == (set(ids(before)) if committed < cut else set())


# The rules file.


def test_rules_file_declares_valid_action_rules() -> None:
    rules = load_rules(Path(__file__).parents[2] / "config/aggregation-rules.yml")
    assert [rule.id for rule in rules.actions.rules] == ["greeting", "x-then-y"]


@pytest.mark.parametrize(
    "change",
    [
        {"rules": [PAIR, PAIR]},  # one id twice
        {"rules": [{**PAIR, "kind": "triple"}]},
        {"rules": [{**PAIR, "min_overlap": 0}]},
        {"rules": [{**PAIR, "within_s": -1}]},
        {"rules": [{**PAIR, "anchor": {"detector": "robot"}}]},
        {"grace_s": -1},
    ],
)
def test_invalid_action_rules_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ActionRules.model_validate({**CONFIG.model_dump(), **change})
