"""Scoring functions of the correlation evaluation, on hand-made cases."""

from __future__ import annotations

import pytest

from aggregator_app.scoring import (
    b_cubed,
    fit_homography,
    iou,
    pair_score,
    slot_pairs,
)


def test_slot_pairs_join_only_different_cameras_in_one_slot() -> None:
    items = [("a", "c1", 0), ("b", "c2", 400), ("c", "c1", 450), ("d", "c2", 500)]
    assert slot_pairs(items, slot_ms=500) == [("a", "b"), ("b", "c")]


def test_pair_score_counts_precision_and_recall() -> None:
    truth = {"a": 1, "b": 1, "c": 2, "d": 2}
    predicted = {"a": "x", "b": "x", "c": "x", "d": "y"}
    score = pair_score(
        [("a", "b"), ("a", "c"), ("c", "d")],
        truth=truth,
        same=lambda p, q: predicted[p] == predicted[q],
    )
    assert (score.truth_same, score.predicted_same, score.both_same) == (2, 2, 1)
    assert score.precision == score.recall == 0.5


def test_b_cubed_is_perfect_for_the_truth_and_split_halves_recall() -> None:
    truth = {"a": 1, "b": 1, "c": 2}
    assert b_cubed(truth, truth).f1 == 1.0

    split = b_cubed({"a": "x", "b": "y", "c": "z"}, truth)
    assert split.precision == 1.0
    assert split.recall == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_b_cubed_merge_lowers_precision() -> None:
    merged = b_cubed({"a": "x", "b": "x", "c": "x"}, {"a": 1, "b": 1, "c": 2})
    assert merged.recall == 1.0
    assert merged.precision == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)


def test_iou_of_boxes() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 1, 1), (5, 5, 1, 1)) == 0.0


def test_fit_homography_recovers_a_known_mapping() -> None:
    def ground(u: float, v: float) -> tuple[float, float]:
        w = 0.001 * v + 1.0
        return (0.02 * u + 1.0) / w, (0.05 * v - 3.0) / w

    points = [(u, v) for u in (0.0, 100.0, 300.0, 640.0) for v in (50.0, 200.0, 480.0)]
    matrix = fit_homography([((u, v), ground(u, v)) for u, v in points])
    u, v = 222.0, 333.0
    w = matrix[2][0] * u + matrix[2][1] * v + matrix[2][2]
    x = (matrix[0][0] * u + matrix[0][1] * v + matrix[0][2]) / w
    y = (matrix[1][0] * u + matrix[1][1] * v + matrix[1][2]) / w
    assert (x, y) == pytest.approx(ground(u, v), rel=1e-6)
