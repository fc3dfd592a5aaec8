"""The episode core: each episode emitted once, arrival order within grace and the
hopping-window boundaries change nothing, cameras and path as documented."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator_app.episodes import EpisodeFuser, Observation, thin_path
from aggregator_app.schema import EpisodeEvent
from rules.config import EpisodeRule

BASE_MS = 1_700_000_000_000
RULE = EpisodeRule(size_s=30, step_s=10, gap_s=15, grace_s=5)
GAP_MS = 15_000
GRACE_MS = 5000

observation_lists = st.lists(
    st.tuples(
        st.sampled_from(["g1", "g2", "g3"]),
        st.integers(min_value=0, max_value=200_000),
        st.sampled_from(["cam-a", "cam-b", "cam-c"]),
        st.floats(min_value=0, max_value=1),
    ),
    min_size=1,
    max_size=60,
)


def observations(
    raw: list[tuple[str, int, str, float]], shift_ms: int = 0
) -> list[Observation]:
    return [
        Observation(
            event_time_ms=BASE_MS + shift_ms + time_ms,
            camera_id=camera,
            global_id=global_id,
            site_id="site",
            x_m=time_ms / 1000,
            y_m=0.0,
            confidence=round(confidence, 3),
            event_id=f"e{index}",
        )
        for index, (global_id, time_ms, camera, confidence) in enumerate(raw)
    ]


def run(
    arrival: list[Observation], *, rule: EpisodeRule = RULE, batch_size: int = 1
) -> list[EpisodeEvent]:
    """Feed observations in this order, then a site watermark far ahead."""
    fuser = EpisodeFuser(rule)
    episodes: list[EpisodeEvent] = []
    for start in range(0, len(arrival), batch_size):
        for observation in arrival[start : start + batch_size]:
            fuser.observe(observation, partition=0)
        episodes += fuser.close_due()
    last_ms = max(o.event_time_ms for o in arrival)
    fuser.advance("site", last_ms + GAP_MS + GRACE_MS + 1)
    return episodes + fuser.close_due()


def expected(items: list[Observation]) -> dict[str, tuple[int, int, int]]:
    """Episodes by the definition: per object, runs split at gaps >= gap_s."""
    episodes: dict[str, tuple[int, int, int]] = {}
    for global_id in {o.global_id for o in items}:
        times = sorted(
            {(o.event_time_ms, o) for o in items if o.global_id == global_id}
        )
        run_start, last, count = times[0][0], times[0][0], 0
        for time_ms, _o in times:
            if time_ms - last >= GAP_MS:
                episodes[f"episode:{global_id}:{run_start}"] = (run_start, last, count)
                run_start, count = time_ms, 0
            last, count = time_ms, count + 1
        episodes[f"episode:{global_id}:{run_start}"] = (run_start, last, count)
    return episodes


def summary(
    episodes: list[EpisodeEvent], shift_ms: int = 0
) -> dict[str, tuple[int, int, int]]:
    result = {}
    for episode in episodes:
        start = episode.start_time_ms - shift_ms
        key = f"episode:{episode.global_id}:{start}"
        result[key] = (start, episode.end_time_ms - shift_ms, episode.observation_count)
    return result


@settings(max_examples=80, deadline=None)
@given(raw=observation_lists, batch_size=st.integers(1, 9))
def test_each_episode_is_emitted_once_as_defined(
    raw: list[tuple[str, int, str, float]], batch_size: int
) -> None:
    items = observations(raw)
    in_order = sorted(items)

    episodes = run(in_order, batch_size=batch_size)

    ids = [episode.aggregated_id for episode in episodes]
    assert len(ids) == len(set(ids))
    assert summary(episodes) == expected(items)


@settings(max_examples=80, deadline=None)
@given(raw=observation_lists, seed=st.integers(0, 10_000), copies=st.integers(0, 10))
def test_arrival_order_within_grace_and_redelivery_change_nothing(
    raw: list[tuple[str, int, str, float]], seed: int, copies: int
) -> None:
    items = observations(raw)
    rng = random.Random(seed)
    arrival = items + [rng.choice(items) for _ in range(copies)]
    arrival.sort(key=lambda o: o.event_time_ms + rng.randrange(GRACE_MS))

    assert [e.model_dump() for e in sorted(run(arrival), key=_id)] == [
        e.model_dump() for e in sorted(run(sorted(items)), key=_id)
    ]


@settings(max_examples=60, deadline=None)
@given(
    raw=observation_lists,
    shift_ms=st.integers(0, 60_000),
    windows=st.sampled_from([(30, 10), (20, 5), (60, 20), (10, 10), (45, 15)]),
)
def test_hopping_window_boundaries_change_nothing(
    raw: list[tuple[str, int, str, float]], shift_ms: int, windows: tuple[int, int]
) -> None:
    size_s, step_s = windows
    rule = RULE.model_copy(update={"size_s": size_s, "step_s": step_s})

    shifted = run(sorted(observations(raw, shift_ms)), rule=rule)
    plain = run(sorted(observations(raw)))

    assert summary(shifted, shift_ms) == summary(plain)


def _id(episode: EpisodeEvent) -> str:
    return episode.aggregated_id


def test_cameras_in_order_visited_path_thinned_best_confidence() -> None:
    raw = [
        ("g", 0, "cam-a", 0.5),
        ("g", 1000, "cam-a", 0.9),
        ("g", 2000, "cam-b", 0.7),
        ("g", 2100, "cam-b", 0.6),
        ("g", 9000, "cam-a", 0.8),
    ]
    (episode,) = run(sorted(observations(raw)))

    assert episode.cameras == ["cam-a", "cam-b", "cam-a"]
    assert (episode.duration_ms, episode.best_confidence) == (9000, 0.9)
    # x_m is the time in s: the 0.1 m step from 2.0 to 2.1 is thinned away.
    assert [point.x_m for point in episode.path] == [0.0, 1.0, 2.0, 9.0]


def test_episode_is_emitted_only_once_quiet_for_the_gap_past_grace() -> None:
    fuser = EpisodeFuser(RULE)
    fuser.observe(observations([("g", 0, "cam-a", 0.5)])[0], partition=0)

    fuser.advance("site", BASE_MS + GAP_MS + GRACE_MS)
    assert fuser.close_due() == []
    fuser.advance("site", BASE_MS + GAP_MS + GRACE_MS + 1)
    assert [e.aggregated_id for e in fuser.close_due()] == [f"episode:g:{BASE_MS}"]


def test_restart_from_stored_panes_emits_the_same() -> None:
    items = sorted(
        observations([("g", t * 1000, "cam-a", 0.5) for t in range(0, 40, 3)])
    )
    first = EpisodeFuser(RULE)
    for observation in items[:7]:
        first.observe(observation, partition=0)
    stored = first.take_changes()

    second = EpisodeFuser(RULE)
    for key, partition, value in stored:
        assert value is not None
        second.load(key, value, partition)
    for observation in items[5:]:  # read again from an earlier offset
        second.observe(observation, partition=0)
    second.advance("site", BASE_MS + 100_000)

    assert summary(second.close_due()) == expected(items)


def test_thin_path_keeps_ends_and_caps_points() -> None:
    points = observations([("g", t * 1000, "cam-a", 0.5) for t in range(100)])
    thinned = thin_path(points, min_distance_m=0.0, max_points=5)
    assert [p.x_m for p in thinned] == [0.0, 25.0, 50.0, 74.0, 99.0]
