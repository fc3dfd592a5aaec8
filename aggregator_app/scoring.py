"""Scores of a grouping against a truth: pairwise precision/recall, B-cubed.

Pure functions over plain dicts (item id -> group id), so that the in-process
and the service evaluation score the same way and tests can check them on
hand-made cases.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

__all__ = [
    "BCubed",
    "PairScore",
    "b_cubed",
    "fit_homography",
    "iou",
    "pair_score",
    "slot_pairs",
]


@dataclass(frozen=True, slots=True)
class PairScore:
    """Pairwise precision and recall over a set of candidate pairs."""

    pairs: int
    truth_same: int
    predicted_same: int
    both_same: int

    @property
    def precision(self) -> float:
        """Return the share of predicted-same pairs that are truly the same."""
        return self.both_same / self.predicted_same if self.predicted_same else 1.0

    @property
    def recall(self) -> float:
        """Return the share of truly-same pairs that are predicted the same."""
        return self.both_same / self.truth_same if self.truth_same else 1.0


@dataclass(frozen=True, slots=True)
class BCubed:
    """B-cubed precision, recall and F1 over every item."""

    items: int
    precision: float
    recall: float

    @property
    def f1(self) -> float:
        """Return the harmonic mean of precision and recall."""
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0


def slot_pairs(
    items: Iterable[tuple[str, str, int]], *, slot_ms: int
) -> list[tuple[str, str]]:
    """Return the pairs of items in one time slot, seen by different cameras.

    ``items`` are ``(item id, camera id, event time ms)``.
    """
    slots: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for item_id, camera_id, time_ms in items:
        slots[time_ms // slot_ms].append((item_id, camera_id))
    pairs: list[tuple[str, str]] = []
    for members in slots.values():
        for (first, first_camera), (second, second_camera) in combinations(members, 2):
            if first_camera != second_camera:
                pairs.append((first, second))
    return pairs


def pair_score(
    pairs: Sequence[tuple[str, str]],
    *,
    truth: Mapping[str, Hashable],
    same: Callable[[str, str], bool],
) -> PairScore:
    """Score a pairwise decision ``same`` against ``truth`` over ``pairs``."""
    truth_same = predicted_same = both_same = 0
    for first, second in pairs:
        is_same = truth[first] == truth[second]
        said_same = same(first, second)
        truth_same += is_same
        predicted_same += said_same
        both_same += is_same and said_same
    return PairScore(
        pairs=len(pairs),
        truth_same=truth_same,
        predicted_same=predicted_same,
        both_same=both_same,
    )


def b_cubed(predicted: Mapping[str, Hashable], truth: Mapping[str, Hashable]) -> BCubed:
    """Return B-cubed scores of ``predicted`` groups against ``truth`` groups.

    Items of ``truth`` without a predicted group count as groups of their own.
    """
    items = list(truth)
    if not items:
        return BCubed(items=0, precision=1.0, recall=1.0)
    predicted_of = {item: predicted.get(item, ("alone", item)) for item in items}
    by_predicted: dict[Hashable, set[str]] = defaultdict(set)
    by_truth: dict[Hashable, set[str]] = defaultdict(set)
    for item in items:
        by_predicted[predicted_of[item]].add(item)
        by_truth[truth[item]].add(item)

    precision = recall = 0.0
    for item in items:
        cluster = by_predicted[predicted_of[item]]
        label = by_truth[truth[item]]
        common = len(cluster & label)
        precision += common / len(cluster)
        recall += common / len(label)
    return BCubed(
        items=len(items), precision=precision / len(items), recall=recall / len(items)
    )


Box = tuple[float, float, float, float]


def iou(first: Box, second: Box) -> float:
    """Return intersection over union of two ``(left, top, width, height)`` boxes."""
    left = max(first[0], second[0])
    top = max(first[1], second[1])
    right = min(first[0] + first[2], second[0] + second[2])
    bottom = min(first[1] + first[3], second[1] + second[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = first[2] * first[3] + second[2] * second[3] - inter
    return inter / union if union > 0 else 0.0


def fit_homography(
    pairs: Sequence[tuple[tuple[float, float], tuple[float, float]]],
) -> list[list[float]]:
    """Fit the 3x3 homography from image points to ground points (least squares).

    ``pairs`` are ``((u, v) pixels, (x, y) metres)``, four or more. The last
    entry of the matrix is fixed at 1; the normal equations are solved by
    Gaussian elimination, which is plenty for eight unknowns.
    """
    normal = [[0.0] * 9 for _ in range(8)]
    for (u, v), (x, y) in pairs:
        for row, target in (
            ([u, v, 1.0, 0.0, 0.0, 0.0, -u * x, -v * x], x),
            ([0.0, 0.0, 0.0, u, v, 1.0, -u * y, -v * y], y),
        ):
            for i in range(8):
                for j in range(8):
                    normal[i][j] += row[i] * row[j]
                normal[i][8] += row[i] * target
    solution = _solve(normal)
    return [solution[0:3], solution[3:6], [solution[6], solution[7], 1.0]]


def _solve(augmented: list[list[float]]) -> list[float]:
    size = len(augmented)
    for column in range(size):
        pivot = max(range(column, size), key=lambda row: abs(augmented[row][column]))
        augmented[column], augmented[pivot] = augmented[pivot], augmented[column]
        for row in range(size):
            if row != column and augmented[column][column]:
                factor = augmented[row][column] / augmented[column][column]
                for k in range(column, size + 1):
                    augmented[row][k] -= factor * augmented[column][k]
    return [augmented[i][size] / augmented[i][i] for i in range(size)]
