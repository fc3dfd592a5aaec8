"""The dedup core: no key emits twice within the window, distinct keys never
suppress each other, and a tumbling-window boundary changes nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator_app.dedup import Deduplicator, MemorySpanStore, dedup_keys
from aggregator_app.schema import DetectorEvent
from rules.config import DedupRule

RULE = DedupRule(window_s=5.0, grace_s=10.0)
WINDOW_MS = 5000
BASE_MS = 1_536_772_838_000


def make_event(
    *,
    event_id: str = "e1",
    camera_id: str = "cam-1",
    tracker_id: str | None = "7",
    time_ms: int = BASE_MS,
    label: str = "car",
    detector: str = "vehicle",
    position: tuple[float, float] | None = None,
) -> DetectorEvent:
    fields: dict[str, object] = {
        "event_id": event_id,
        "detector": detector,
        "source": "test",
        "camera_id": camera_id,
        "event_time_ms": time_ms,
        "label": label,
        "tracker_id": tracker_id,
    }
    if position is not None:
        fields["position"] = {"x_m": position[0], "y_m": position[1]}
    return DetectorEvent.model_validate(fields)


def make_dedup() -> Deduplicator:
    return Deduplicator(RULE, MemorySpanStore())


def test_redelivery_of_kept_event_is_dropped() -> None:
    dedup = make_dedup()

    first = dedup.observe(make_event(), partition=0)
    again = dedup.observe(make_event(), partition=0)

    assert first.outcome == "kept"
    assert again.outcome == "redelivery"
    assert again.span.kept_id == "e1"


def test_repeat_is_absorbed_and_recorded() -> None:
    dedup = make_dedup()
    dedup.observe(make_event(event_id="a"), partition=0)

    decision = dedup.observe(
        make_event(event_id="b", time_ms=BASE_MS + 4999), partition=0
    )

    assert decision.outcome == "repeat"
    assert decision.span.absorbed_ids == ["b"]
    assert decision.span.absorbed_count == 1


def test_repeat_at_window_length_opens_new_span() -> None:
    dedup = make_dedup()
    dedup.observe(make_event(event_id="a"), partition=0)

    decision = dedup.observe(
        make_event(event_id="b", time_ms=BASE_MS + WINDOW_MS), partition=0
    )

    assert decision.outcome == "kept"


def test_trackerless_events_match_in_neighbouring_cell() -> None:
    dedup = make_dedup()
    dedup.observe(
        make_event(event_id="a", tracker_id=None, position=(9.99, 3.0)), partition=0
    )

    decision = dedup.observe(
        make_event(event_id="b", tracker_id=None, position=(10.01, 3.0)), partition=0
    )

    assert decision.outcome == "repeat"


def test_span_closes_when_watermark_passes_window_and_grace() -> None:
    dedup = make_dedup()
    dedup.observe(make_event(event_id="a"), partition=0)
    dedup.observe(make_event(event_id="b", time_ms=BASE_MS + 1000), partition=0)

    dedup.observe(
        make_event(event_id="c", tracker_id="9", time_ms=BASE_MS + 14_999), partition=0
    )
    assert dedup.close_due(partitions=[0]) == []

    dedup.observe(
        make_event(event_id="d", tracker_id="9", time_ms=BASE_MS + 15_000), partition=0
    )
    closed = dedup.close_due(partitions=[0])
    assert [span.kept_id for _, span in closed] == ["a"]
    assert closed[0][1].absorbed_ids == ["b"]


def test_spans_survive_a_new_deduplicator_over_the_same_store() -> None:
    store = MemorySpanStore()
    before = Deduplicator(RULE, store)
    before.observe(make_event(event_id="a"), partition=0)
    before.flush(0)

    after = Deduplicator(RULE, store)
    decision = after.observe(
        make_event(event_id="b", time_ms=BASE_MS + 2000), partition=0
    )

    assert decision.outcome == "repeat"


def test_forget_keeps_open_spans() -> None:
    dedup = make_dedup()
    dedup.observe(make_event(event_id="a"), partition=0)

    assert dedup.forget_before(0, BASE_MS + 60_000) == 0
    dedup.close_due(partitions=[0], force=True)
    assert dedup.forget_before(0, BASE_MS + 60_000) == 1


# Streams of (tracker, offset ms) pairs for one camera; offsets sorted or not.
arrivals = st.lists(
    st.tuples(st.sampled_from(["1", "2", "3"]), st.integers(0, 60_000)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(arrivals, st.integers(0, WINDOW_MS - 1))
def test_no_key_is_kept_twice_within_the_window(
    stream: list[tuple[str, int]], shift_ms: int
) -> None:
    dedup = make_dedup()
    kept: dict[str, list[int]] = {}

    for index, (tracker, offset_ms) in enumerate(stream):
        event = make_event(
            event_id=f"e{index}",
            tracker_id=tracker,
            time_ms=BASE_MS + shift_ms + offset_ms,
        )
        if dedup.observe(event, partition=0).outcome == "kept":
            kept.setdefault(tracker, []).append(event.event_time_ms)

    for times in kept.values():
        times.sort()
        assert all(
            later - earlier >= WINDOW_MS
            for earlier, later in zip(times, times[1:], strict=False)
        )


@settings(max_examples=200, deadline=None)
@given(arrivals)
def test_distinct_keys_never_suppress_each_other(stream: list[tuple[str, int]]) -> None:
    together = make_dedup()
    kept_together: set[str] = set()
    for index, (tracker, offset_ms) in enumerate(stream):
        event = make_event(
            event_id=f"e{index}", tracker_id=tracker, time_ms=BASE_MS + offset_ms
        )
        if together.observe(event, partition=0).outcome == "kept":
            kept_together.add(event.event_id)

    kept_apart: set[str] = set()
    for tracker in {tracker for tracker, _ in stream}:
        alone = make_dedup()
        for index, (other, offset_ms) in enumerate(stream):
            if other != tracker:
                continue
            event = make_event(
                event_id=f"e{index}", tracker_id=tracker, time_ms=BASE_MS + offset_ms
            )
            if alone.observe(event, partition=0).outcome == "kept":
                kept_apart.add(event.event_id)

    assert kept_together == kept_apart


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4_999), min_size=2, max_size=30), st.integers(0, 10_000))
def test_window_boundary_changes_nothing(offsets_ms: list[int], shift_ms: int) -> None:
    """Repeats closer than the window are absorbed wherever the boundary falls."""
    dedup = make_dedup()
    start_ms = BASE_MS + shift_ms
    outcomes = [
        dedup.observe(
            make_event(event_id=f"e{i}", time_ms=start_ms + offset), partition=0
        ).outcome
        for i, offset in enumerate(sorted(offsets_ms))
    ]
    assert outcomes[0] == "kept"
    assert all(outcome != "kept" for outcome in outcomes[1:])


def test_dedup_keys_separate_cameras_and_detectors() -> None:
    one, _ = dedup_keys(make_event(camera_id="a"), RULE)
    other_camera, _ = dedup_keys(make_event(camera_id="b"), RULE)
    other_detector, _ = dedup_keys(make_event(detector="person", label="person"), RULE)

    assert len({one, other_camera, other_detector}) == 3


def test_kept_event_read_again_at_same_position_is_reprocessed() -> None:
    dedup = make_dedup()
    dedup.observe(make_event(event_id="a"), partition=0, position="t/0/5")

    again = dedup.observe(make_event(event_id="a"), partition=0, position="t/0/5")
    retried = dedup.observe(make_event(event_id="a"), partition=0, position="t/0/9")

    assert again.outcome == "reprocessed"
    assert retried.outcome == "redelivery"


def test_span_opened_by_a_later_record_does_not_absorb_an_earlier_one() -> None:
    """After a crash, records are read again while the table already holds
    the spans they went on to open; the stream must replay as it ran."""
    dedup = make_dedup()
    dedup.observe(make_event(event_id="late", time_ms=BASE_MS + 3000), 0, "t/0/9")

    earlier = dedup.observe(make_event(event_id="early"), 0, "t/0/4")

    assert earlier.outcome == "kept"


def test_an_event_dated_ahead_of_the_clock_moves_no_watermark_past_it() -> None:
    dedup = make_dedup()
    now_ms = BASE_MS
    dedup.observe(make_event(event_id="a"), partition=0, latest_ms=now_ms)

    ahead = make_event(event_id="ahead", camera_id="cam-fast", time_ms=now_ms + 290_000)
    decision = dedup.observe(ahead, partition=0, latest_ms=now_ms + 1000)

    assert decision.outcome == "kept"
    assert dedup.watermark_ms(0) == now_ms + 1000
    assert dedup.close_due(partitions=[0]) == []
    repeat = make_event(event_id="b", time_ms=now_ms + 2000)
    assert dedup.observe(repeat, partition=0, latest_ms=now_ms + 3000).outcome == (
        "repeat"
    )


@given(
    lead_ms=st.integers(min_value=0, max_value=600_000),
    times_ms=st.lists(st.integers(min_value=0, max_value=60_000), max_size=20),
)
def test_property_the_watermark_never_passes_the_cap(
    lead_ms: int, times_ms: list[int]
) -> None:
    dedup = make_dedup()
    cap_ms = BASE_MS + 30_000

    for index, offset_ms in enumerate(times_ms):
        event = make_event(event_id=f"e{index}", time_ms=BASE_MS + offset_ms)
        dedup.observe(event, partition=0, latest_ms=cap_ms)
    dedup.observe(
        make_event(event_id="far", tracker_id="x", time_ms=cap_ms + lead_ms),
        partition=0,
        latest_ms=cap_ms,
    )

    watermark_ms = dedup.watermark_ms(0)
    assert watermark_ms is not None
    assert watermark_ms <= cap_ms
