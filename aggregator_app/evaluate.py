"""How well correlation groups real events: ``aggregator-evaluate``.

Two data sets (``/work/shared/data``, README there):

* ``garage``: the DeepStream garage messages with ``object.id`` removed from
  every message; the global ids are scored against ``object.id`` (NVIDIA's own
  multi-camera tracker: a silver truth). Pairwise precision/recall over the
  pairs of messages in one 0.5 s slot on different cameras, and B-cubed over
  whole tracks, both over the ``moving`` messages (``parked`` and ``empty``
  describe parking spots, not objects). The plain rule "same slot and under
  8 m" is printed beside it.
* ``tud``: TUD-Stadtmitte Faster R-CNN detections at ``(frame - 1) / 25`` s;
  a detection's truth is the ground-truth box it overlaps most in its frame
  (IoU >= 0.5, greedy by overlap); its ground position comes from the foot
  point of its box through the homography in the rules file (fitted to the
  ground-truth boxes, ``--fit-homography``). B-cubed over the matched
  detections scores how the repeats of one person are grouped.

Modes: ``--mode core`` runs :class:`~aggregator_app.correlate.Correlator` in
this process (fast; used to tune). ``--mode service`` replays the data into
the running worker's detector topics and reads the assignments back from
``<app id>-assignments``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aggregator_app.correlate import Correlator, Step
from aggregator_app.ingest import RawRecord, parse_record
from aggregator_app.schema import DetectorEvent
from aggregator_app.scoring import (
    BCubed,
    PairScore,
    b_cubed,
    fit_homography,
    iou,
    pair_score,
    slot_pairs,
)
from aggregator_app.timeparse import to_epoch_ms
from rules.config import RulesConfig, SourceConfig, load_rules

__all__ = [
    "Labelled",
    "garage_events",
    "main",
    "run_core",
    "score_garage",
    "score_tud",
    "tud_events",
]

_REPO: Final = Path(__file__).resolve().parent.parent
_DEFAULT_DATA: Final = _REPO.parent / "shared" / "data"
_SLOT_MS: Final = 500
_BASELINE_M: Final = 8.0
_TUD_FPS: Final = 25
_TUD_CAMERA: Final = "TUD-Stadtmitte"
#: Event time of frame 1 of a TUD replay: any fixed time does.
_TUD_START_MS: Final = 1_700_000_000_000


@dataclass(frozen=True, slots=True)
class Labelled:
    """An event with its truth label (``None``: no truth, not scored)."""

    event: DetectorEvent
    truth: str | None
    payload: bytes
    key: str = ""


def data_dir(option: str | None) -> Path:
    """Return the shared data folder: the option, ``AGGREGATOR_DATA``, or ../shared."""
    return Path(option or os.environ.get("AGGREGATOR_DATA") or _DEFAULT_DATA)


def garage_events(path: Path, rules: RulesConfig) -> list[Labelled]:
    """Read the garage file, in file order, with ``object.id`` taken out."""
    source = _source(rules, "deepstream")
    labelled = []
    for offset, line in enumerate(path.read_bytes().splitlines()):
        if not line.strip():
            continue
        message = json.loads(line)
        truth = message["object"].pop("id")
        moving = message.get("event", {}).get("type") == "moving"
        payload = json.dumps(message).encode()
        record = RawRecord(
            value=payload,
            key=None,
            topic=source.topic,
            partition=0,
            offset=offset,
            timestamp_ms=to_epoch_ms(message["@timestamp"], naive="utc"),
            replayed=True,
        )
        for event in parse_record(record, source=source, rules=rules, now_ms=0):
            labelled.append(
                Labelled(event, truth if moving else None, payload, key=event.camera_id)
            )
    return labelled


def _source(rules: RulesConfig, adapter: str) -> SourceConfig:
    for source in rules.sources:
        if source.adapter == adapter:
            # The file's clock is the reference: skew is not what is measured.
            return source
    raise SystemExit(f"evaluate: no source with adapter {adapter} in the rules")


def tud_rows(folder: Path) -> tuple[list[list[float]], list[list[float]]]:
    """Return the detection rows and ground-truth rows of a MOT sequence."""

    def read(name: str) -> list[list[float]]:
        text = (folder / name).read_text(encoding="utf-8")
        return [
            [float(v) for v in line.split(",")] for line in text.splitlines() if line
        ]

    return read("det_frcnn_sort.txt"), read("gt.txt")


def tud_truth(
    detections: Sequence[list[float]], truth_rows: Sequence[list[float]]
) -> list[list[float] | None]:
    """Return each detection's truth row: best IoU >= 0.5 in its frame, greedy."""
    by_frame: dict[int, list[list[float]]] = {}
    for row in truth_rows:
        by_frame.setdefault(int(row[0]), []).append(row)
    labels: list[list[float] | None] = [None] * len(detections)
    frames: dict[int, list[int]] = {}
    for index, row in enumerate(detections):
        frames.setdefault(int(row[0]), []).append(index)
    for frame, indices in frames.items():
        candidates = sorted(
            (
                (iou(_box(detections[i]), _box(gt)), i, int(gt[1]), gt)
                for i in indices
                for gt in by_frame.get(frame, [])
            ),
            reverse=True,
        )
        used_truth: set[int] = set()
        for overlap, index, truth_id, gt in candidates:
            if overlap < 0.5:
                break
            if labels[index] is None and truth_id not in used_truth:
                labels[index] = gt
                used_truth.add(truth_id)
    return labels


def _box(row: Sequence[float]) -> tuple[float, float, float, float]:
    return row[2], row[3], row[4], row[5]


def tud_events(folder: Path, rules: RulesConfig) -> list[Labelled]:
    """Return TUD-Stadtmitte's detections as events, with their truth ids.

    Each detection becomes the MOT row the service would receive (keyed by
    the sequence, timed by its frame), with the matched ground-truth box's
    world position in its x, y, z columns; an unmatched detection keeps
    ``-1`` there and is placed by the camera's homography. The row goes
    through the MOT adapter, so event ids are those the service makes.
    """
    detections, truth_rows = tud_rows(folder)
    matches = tud_truth(detections, truth_rows)
    source = _source(rules, "mot")
    labelled = []
    for offset, (row, matched) in enumerate(zip(detections, matches, strict=True)):
        world = row[7:10] if matched is None else matched[7:10]
        payload = ",".join(_number(v) for v in [*row[:7], *world]).encode()
        time_ms = _TUD_START_MS + (int(row[0]) - 1) * 1000 // _TUD_FPS
        record = RawRecord(
            value=payload,
            key=_TUD_CAMERA.encode(),
            topic=source.topic,
            partition=0,
            offset=offset,
            timestamp_ms=time_ms,
            replayed=True,
        )
        label = None if matched is None else str(int(matched[1]))
        for event in parse_record(record, source=source, rules=rules, now_ms=time_ms):
            labelled.append(Labelled(event, label, payload, key=_TUD_CAMERA))
    return labelled


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def tud_homography(folder: Path) -> list[list[float]]:
    """Fit the camera's homography: ground-truth foot points to world x, y."""
    _detections, truth_rows = tud_rows(folder)
    pairs = [
        ((row[2] + row[4] / 2, row[3] + row[5]), (row[7], row[8])) for row in truth_rows
    ]
    return fit_homography(pairs)


def run_core(
    labelled: Sequence[Labelled],
    rules: RulesConfig,
    *,
    clock: Callable[[int], float] | None = None,
) -> tuple[dict[str, str], int]:
    """Correlate events in this process, one at a time in the given order.

    ``clock`` turns the highest event time seen so far into the wall clock
    (``None``: a fast replay, no camera ever idles). Returns the global id of
    every correlated event and how many were late.
    """
    correlator = Correlator(rules.correlation)
    assigned: dict[str, str] = {}
    merged: dict[str, str] = {}
    front_ms = 0
    for item in labelled:
        front_ms = max(front_ms, item.event.event_time_ms)
        now_s = clock(front_ms) if clock is not None else 0.0
        step = correlator.add([item.event], now_s=now_s)
        _collect(step, assigned, merged)
    step = correlator.advance_all(now_s=math.inf, flush=True)
    _collect(step, assigned, merged)
    return resolve_merges(assigned, merged), correlator.late_count


def _collect(step: Step, assigned: dict[str, str], merged: dict[str, str]) -> None:
    assigned.update((a.event_id, a.global_id) for a in step.assignments)
    merged.update(
        (track.global_id, track.merged_into)
        for track in step.closed
        if track.merged_into is not None
    )


def resolve_merges(assigned: dict[str, str], merged: dict[str, str]) -> dict[str, str]:
    """Return every event's global id after the merges (as a consumer reads them).

    A closed ``correlated`` event with ``merged_into`` says that its global id
    is the same object as that one, from then on and before.
    """

    def final(global_id: str) -> str:
        seen = set()
        while global_id in merged and global_id not in seen:
            seen.add(global_id)
            global_id = merged[global_id]
        return global_id

    return {event_id: final(global_id) for event_id, global_id in assigned.items()}


@dataclass(frozen=True, slots=True)
class GarageScore:
    """The garage figures of one run, and of the plain baseline rule."""

    pairs: PairScore
    baseline: PairScore
    tracks: BCubed
    late: int
    events: int


def score_garage(
    labelled: Sequence[Labelled], assigned: dict[str, str], late: int
) -> GarageScore:
    """Score global ids against the garage's ``object.id``."""
    scored = [item for item in labelled if item.truth is not None]
    truth = {item.event.event_id: str(item.truth) for item in scored}
    events = {item.event.event_id: item.event for item in scored}
    pairs = slot_pairs(
        ((e.event_id, e.camera_id, e.event_time_ms) for e in events.values()),
        slot_ms=_SLOT_MS,
    )

    def same_global(first: str, second: str) -> bool:
        found = assigned.get(first)
        return found is not None and found == assigned.get(second)

    def near(first: str, second: str) -> bool:
        a, b = events[first].position, events[second].position
        if a is None or b is None:
            return False
        return math.hypot(a.x_m - b.x_m, a.y_m - b.y_m) < _BASELINE_M

    return GarageScore(
        pairs=pair_score(pairs, truth=truth, same=same_global),
        baseline=pair_score(pairs, truth=truth, same=near),
        tracks=b_cubed(assigned, truth),
        late=late,
        events=len(labelled),
    )


def score_tud(
    labelled: Sequence[Labelled], assigned: dict[str, str]
) -> tuple[BCubed, int, int]:
    """Score TUD grouping; also count false detections merged into a person.

    Returns B-cubed over matched detections, the number of unmatched
    detections, and how many of them share a global id with a matched one.
    """
    truth = {
        item.event.event_id: item.truth for item in labelled if item.truth is not None
    }
    person_ids = {assigned.get(event_id) for event_id in truth}
    unmatched = [item for item in labelled if item.truth is None]
    merged = sum(
        1 for item in unmatched if assigned.get(item.event.event_id) in person_ids
    )
    return b_cubed(assigned, truth), len(unmatched), merged


def print_garage(score: GarageScore, *, mode: str) -> None:
    """Print the garage figures."""
    pairs, base = score.pairs, score.baseline
    print(
        f"garage[{mode}]: events={score.events} late={score.late} "
        f"slot_pairs={pairs.pairs} truth_same={pairs.truth_same}"
    )
    print(
        f"  correlation: pairwise P={pairs.precision:.2%} R={pairs.recall:.2%} "
        f"b_cubed P={score.tracks.precision:.2%} R={score.tracks.recall:.2%} "
        f"F1={score.tracks.f1:.4f}"
    )
    print(
        f"  baseline (same 0.5 s slot, < {_BASELINE_M:.0f} m): "
        f"pairwise P={base.precision:.2%} R={base.recall:.2%}"
    )


def print_tud(score: BCubed, unmatched: int, merged: int, *, mode: str) -> None:
    """Print the TUD figures."""
    print(
        f"tud[{mode}]: matched={score.items} b_cubed P={score.precision:.2%} "
        f"R={score.recall:.2%} F1={score.f1:.4f} "
        f"unmatched={unmatched} unmatched_merged_into_person={merged}"
    )


def _live_clock(front_ms: int) -> float:
    """A recording replayed live: the wall clock follows the newest event."""
    return front_ms / 1000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; print the figures."""
    parser = argparse.ArgumentParser(prog="aggregator-evaluate", description=__doc__)
    parser.add_argument(
        "dataset", choices=["garage", "tud", "all"], nargs="?", default="all"
    )
    parser.add_argument("--mode", choices=["core", "service"], default="core")
    parser.add_argument("--data", help="shared data folder (default ../shared/data)")
    parser.add_argument("--rules", default=str(_REPO / "config/aggregation-rules.yml"))
    parser.add_argument(
        "--fit-homography",
        action="store_true",
        help="print the TUD-Stadtmitte homography fitted to its ground truth",
    )
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--speed",
        type=float,
        help="service mode: replay at this many times real time (default: at once)",
    )
    args = parser.parse_args(argv)
    rules = load_rules(args.rules)
    folder = data_dir(args.data)

    if args.fit_homography:
        matrix = tud_homography(folder / "mot15-tud" / _TUD_CAMERA)
        print(json.dumps(matrix))
        return 0

    datasets = ["garage", "tud"] if args.dataset == "all" else [args.dataset]
    for dataset in datasets:
        labelled = _load(dataset, folder, rules)
        if args.mode == "core":
            _evaluate_core(dataset, labelled, rules)
        else:
            from aggregator_app.evaluate_service import run_service

            started_s = time.monotonic()
            assigned, late = asyncio.run(
                run_service(
                    dataset, labelled, rules, timeout_s=args.timeout_s, speed=args.speed
                )
            )
            print(f"{dataset}[service]: took_s={time.monotonic() - started_s:.1f}")
            _print(dataset, labelled, assigned, late, mode="service")
    return 0


def _load(dataset: str, folder: Path, rules: RulesConfig) -> list[Labelled]:
    if dataset == "garage":
        return garage_events(folder / "deepstream-360d-garage" / "demo-1.jsonl", rules)
    return tud_events(folder / "mot15-tud" / _TUD_CAMERA, rules)


def _evaluate_core(dataset: str, labelled: list[Labelled], rules: RulesConfig) -> None:
    for mode, clock in (("core-fast", None), ("core-live", _live_clock)):
        assigned, late = run_core(labelled, rules, clock=clock)
        _print(dataset, labelled, assigned, late, mode=mode)


def _print(
    dataset: str,
    labelled: list[Labelled],
    assigned: dict[str, str],
    late: int,
    *,
    mode: str,
) -> None:
    if dataset == "garage":
        print_garage(score_garage(labelled, assigned, late), mode=mode)
    else:
        score, unmatched, merged = score_tud(labelled, assigned)
        print_tud(score, unmatched, merged, mode=f"{mode} late={late}")


if __name__ == "__main__":
    sys.exit(main())
