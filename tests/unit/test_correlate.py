"""The correlation core: grouping, must-not-link, watermarks, late events."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator_app.correlate import Correlator, SiteState, ground_position
from aggregator_app.schema import BBox, DetectorEvent, DetectorKind, GroundPoint
from rules.config import CorrelationRule

START_MS = 1_700_000_000_000
RULE = CorrelationRule(
    grace_s=2.0,
    must_not_link={"cam-c": ["cam-a"]},
)


def make_event(
    index: int, *, camera: str, time_ms: int, x_m: float, y_m: float = 0.0
) -> DetectorEvent:
    return DetectorEvent(
        event_id=f"e{index}",
        detector=DetectorKind.VEHICLE,
        source="unified",
        camera_id=camera,
        site_id="site",
        event_time_ms=START_MS + time_ms,
        label="car",
        position=GroundPoint(x_m=x_m, y_m=y_m),
    )


def run(events: list[DetectorEvent], rule: CorrelationRule = RULE) -> dict[str, str]:
    correlator = Correlator(rule)
    assigned: dict[str, str] = {}
    for event in events:
        step = correlator.add([event], now_s=0.0)
        assigned.update((a.event_id, a.global_id) for a in step.assignments)
    step = correlator.advance_all(now_s=math.inf, flush=True)
    assigned.update((a.event_id, a.global_id) for a in step.assignments)
    return assigned


def groups(assigned: dict[str, str]) -> set[frozenset[str]]:
    by_id: dict[str, set[str]] = {}
    for event_id, global_id in assigned.items():
        by_id.setdefault(global_id, set()).add(event_id)
    return {frozenset(members) for members in by_id.values()}


#: Two cars driving past three cameras, 500 ms apart, 30 m from each other.
scene = st.lists(
    st.tuples(
        st.sampled_from(["cam-a", "cam-b", "cam-c"]),
        st.integers(min_value=0, max_value=40),
        st.sampled_from([0.0, 30.0]),
        st.floats(min_value=-1.0, max_value=1.0),
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda item: (item[0], item[1], item[2]),
)


def scene_events(items: list[tuple[str, int, float, float]]) -> list[DetectorEvent]:
    return [
        make_event(
            index,
            camera=camera,
            time_ms=slot * 500,
            x_m=lane_m + slot * 0.5 + noise_m,
        )
        for index, (camera, slot, lane_m, noise_m) in enumerate(items)
    ]


def test_two_cameras_seeing_one_object_give_one_global_id() -> None:
    events = [
        make_event(1, camera="cam-a", time_ms=0, x_m=0.0),
        make_event(2, camera="cam-b", time_ms=10, x_m=1.5),
        make_event(3, camera="cam-a", time_ms=500, x_m=1.0),
        make_event(4, camera="cam-b", time_ms=510, x_m=2.4),
    ]
    assert len(set(run(events).values())) == 1


def test_objects_far_apart_stay_apart() -> None:
    events = [
        make_event(1, camera="cam-a", time_ms=0, x_m=0.0),
        make_event(2, camera="cam-b", time_ms=0, x_m=40.0),
    ]
    assert len(set(run(events).values())) == 2


@settings(max_examples=60, deadline=None)
@given(scene, st.randoms(use_true_random=False))
def test_grouping_does_not_depend_on_arrival_order(items, random) -> None:  # type: ignore[no-untyped-def]  # hypothesis fills them
    """Events delayed by less than the grace period (2 s) are grouped alike."""
    events = sorted(scene_events(items), key=lambda event: event.event_time_ms)
    delayed = sorted(
        events, key=lambda event: event.event_time_ms + random.uniform(0, 1_500)
    )
    assert groups(run(events)) == groups(run(delayed))
    assert set(run(delayed)) == {event.event_id for event in events}


@settings(max_examples=60, deadline=None)
@given(scene)
def test_must_not_link_cameras_never_share_a_global_id(items) -> None:  # type: ignore[no-untyped-def]  # hypothesis fills it
    events = scene_events(items)
    assigned = run(events)
    camera_of = {event.event_id: event.camera_id for event in events}
    for members in groups(assigned):
        cameras = {camera_of[event_id] for event_id in members}
        assert not {"cam-a", "cam-c"} <= cameras


@settings(max_examples=60, deadline=None)
@given(scene, st.randoms(use_true_random=False))
def test_watermark_never_moves_back_and_late_events_count_once(items, random) -> None:  # type: ignore[no-untyped-def]  # hypothesis fills them
    events = scene_events(items)
    random.shuffle(events)
    correlator = Correlator(RULE.model_copy(update={"grace_s": 0.5}))
    watermark_ms = -1
    late_ids: list[str] = []
    for event in [*events, *events]:  # every event delivered twice
        step = correlator.add([event], now_s=0.0)
        late_ids.extend(late.event.event_id for late in step.late)
        assert correlator.watermark_ms("site") >= watermark_ms
        watermark_ms = correlator.watermark_ms("site")

    assert len(late_ids) == len(set(late_ids)) == correlator.late_count
    step = correlator.advance_all(now_s=math.inf, flush=True)
    decided = {a.event_id for a in step.assignments}
    assert not decided.intersection(late_ids)


def test_late_event_reports_how_late() -> None:
    correlator = Correlator(RULE.model_copy(update={"grace_s": 1.0}))
    correlator.add([make_event(1, camera="cam-a", time_ms=10_000, x_m=0)], now_s=0)
    step = correlator.add(
        [make_event(2, camera="cam-a", time_ms=5_000, x_m=0)], now_s=0
    )
    assert [late.late_by_ms for late in step.late] == [4_000]


def test_a_silent_camera_stops_holding_time_back() -> None:
    correlator = Correlator(RULE.model_copy(update={"idle_camera_after_s": 5.0}))
    correlator.add([make_event(1, camera="cam-b", time_ms=0, x_m=0)], now_s=0.0)
    correlator.add([make_event(2, camera="cam-a", time_ms=9_000, x_m=0)], now_s=1.0)
    held_ms = correlator.watermark_ms("site")
    correlator.advance("site", now_s=7.0)
    assert held_ms < START_MS + 1_000 <= correlator.watermark_ms("site")


def test_a_camera_running_ahead_does_not_move_time_for_others() -> None:
    correlator = Correlator(RULE)
    correlator.add([make_event(1, camera="cam-a", time_ms=0, x_m=0)], now_s=0.0)
    correlator.add([make_event(2, camera="cam-b", time_ms=600_000, x_m=0)], now_s=0.0)
    assert correlator.watermark_ms("site") < START_MS


def test_site_state_round_trips_through_json() -> None:
    correlator = Correlator(RULE)
    correlator.add(
        [
            make_event(1, camera="cam-a", time_ms=0, x_m=0),
            make_event(2, camera="cam-b", time_ms=5_000, x_m=3),
        ],
        now_s=0,
    )
    state = correlator.site("site")
    assert SiteState.from_json(state.to_json()).to_json() == state.to_json()


def test_an_open_track_is_reported_as_made_whatever_the_batch_adds() -> None:
    correlator = Correlator(RULE)
    events = [
        make_event(1, camera="cam-a", time_ms=0, x_m=0),
        make_event(2, camera="cam-a", time_ms=500, x_m=0.5),
        make_event(3, camera="cam-a", time_ms=9_000, x_m=20),
    ]
    step = correlator.add(events, now_s=0)
    first = next(t for t in step.opened if t.global_id == "site:e1")
    assert (first.member_count, first.member_ids, first.last_ms) == (
        1,
        ["e1"],
        START_MS,
    )


def test_without_positions_adjacent_zones_are_one_object() -> None:
    rule = RULE.model_copy(update={"zone_adjacency": {"ramp": ["lane-1"]}})
    events = [
        make_event(1, camera="cam-a", time_ms=0, x_m=0).model_copy(
            update={"position": None, "zone_id": "ramp"}
        ),
        make_event(2, camera="cam-b", time_ms=500, x_m=0).model_copy(
            update={"position": None, "zone_id": "lane-1"}
        ),
        make_event(3, camera="cam-b", time_ms=600, x_m=0).model_copy(
            update={"position": None, "zone_id": "exit"}
        ),
    ]
    ids = run(events, rule)
    assert ids["e1"] == ids["e2"] != ids["e3"]


def test_ground_position_from_the_camera_homography() -> None:
    rule = RULE.model_copy(
        update={
            "homographies": {
                "cam-a": ((0.01, 0.0, 1.0), (0.0, 0.02, -2.0), (0.0, 0.0, 1.0))
            }
        }
    )
    event = make_event(1, camera="cam-a", time_ms=0, x_m=0).model_copy(
        update={
            "position": None,
            "bbox_px": BBox(x_min=100, y_min=50, x_max=300, y_max=250),
        }
    )
    assert ground_position(event, rule) == pytest.approx((3.0, 3.0))
    assert (
        ground_position(event.model_copy(update={"camera_id": "cam-b"}), rule) is None
    )
