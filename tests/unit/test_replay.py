"""The pure parts of the replay tool: reading each format, duplicates, rebasing."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator_app.replay import (
    REPLAY_HEADER,
    ReplayRecord,
    default_camera,
    guess_format,
    plan_sends,
    read_fps,
    read_payloads,
    read_records,
    rebase_records,
    to_record,
)
from aggregator_app.timeparse import to_epoch_ms

FIXTURES = Path(__file__).parents[1] / "fixtures"
GARAGE = FIXTURES / "deepstream-360d-garage" / "demo-1.jsonl"
SAMPLES = FIXTURES / "payload-samples"
TEST4 = SAMPLES / "deepstream" / "deepstream-test4-full-schema.json"
FRIGATE_RECORDS = SAMPLES / "frigate" / "events_front_door.json"
DLSTREAMER_LINES = SAMPLES / "dlstreamer" / "gvametapublish-lines.jsonl"

STREAM_START_MS = 1_700_000_000_000
NOW_MS = 1_800_000_000_000
MOT_ROWS = (
    b"1,-1,340.8,79.5,87.7,244.3,0.998,-1,-1,-1\n"
    b"1,-1,570.8,80.8,68.2,203.6,0.998,-1,-1,-1\n"
    b"8,-1,181.4,89.7,75.9,245.9,0.996,-1,-1,-1\n"
)


def make_mot_sequence(
    tmp_path: Path, *, name: str = "TUD-Test", fps: int | None = 7
) -> Path:
    sequence = tmp_path / name / "det"
    sequence.mkdir(parents=True)
    if fps is not None:
        ini = f"[Sequence]\nname={name}\nframeRate={fps}\n"
        (sequence.parent / "seqinfo.ini").write_text(ini, encoding="utf-8")
    rows = sequence / "det.txt"
    rows.write_bytes(MOT_ROWS)
    return rows


def make_records(*timestamps_ms: int | None) -> list[ReplayRecord]:
    return [
        ReplayRecord(b"cam", stamp, f"m{index}".encode())
        for index, stamp in enumerate(timestamps_ms)
    ]


def times_ms(records: list[ReplayRecord]) -> list[int]:
    stamps = [record.timestamp_ms for record in records]
    assert None not in stamps
    return [stamp for stamp in stamps if stamp is not None]


# -- reading each format ------------------------------------------------------


def test_deepstream_lines_keep_file_order_with_their_jitter() -> None:
    records = read_records(GARAGE, fmt="deepstream")

    lines = GARAGE.read_bytes().splitlines()
    assert [record.value for record in records] == lines
    stamps_ms = times_ms(records)
    pairs = zip(stamps_ms, stamps_ms[1:], strict=False)
    backwards = sum(1 for a, b in pairs if b < a)
    assert backwards == 648


def test_deepstream_record_is_keyed_by_sensor_and_stamped_with_its_time() -> None:
    first = read_records(GARAGE, fmt="deepstream")[0]

    assert first.key == b"10_110_127_110_A1"
    assert first.timestamp_ms == to_epoch_ms("2018-09-12T17:20:38.026Z", naive="utc")


def test_a_deepstream_file_of_one_object_is_one_record() -> None:
    (record,) = read_records(TEST4, fmt="deepstream")

    assert record.key == b"CAMERA_ID"
    assert record.timestamp_ms == to_epoch_ms("2021-03-31T20:11:07.742Z", naive="utc")
    assert orjson.loads(record.value)["messageid"] == (
        "ff7cc527-d019-4348-8b25-6df69c5b6dcc"
    )


def test_frigate_array_gives_one_record_per_element() -> None:
    elements = orjson.loads(FRIGATE_RECORDS.read_bytes())

    records = read_records(FRIGATE_RECORDS, fmt="frigate")

    assert len(records) == len(elements) == 50
    assert [orjson.loads(record.value) for record in records] == elements
    assert {record.key for record in records} == {b"front_door"}
    assert records[0].timestamp_ms == round(elements[0]["start_time"] * 1000)


def test_frigate_mqtt_message_is_keyed_by_the_camera_after() -> None:
    message = {"type": "new", "after": {"camera": "yard", "frame_time": 1700000000.25}}

    record = to_record(orjson.dumps(message), fmt="frigate")

    assert record.key == b"yard"
    assert record.timestamp_ms == 1_700_000_000_250


def test_dlstreamer_lines_take_camera_and_stream_start() -> None:
    records = read_records(
        DLSTREAMER_LINES, fmt="dlstreamer", stream_start_ms=STREAM_START_MS
    )

    assert len(records) == 12
    assert {record.key for record in records} == {b"dlstreamer-gvametapublish-lines"}
    offset_ns = orjson.loads(records[0].value)["timestamp"]
    assert records[0].timestamp_ms == STREAM_START_MS + offset_ns // 1_000_000


def test_mot_rows_take_sequence_name_and_frame_rate(tmp_path: Path) -> None:
    rows = make_mot_sequence(tmp_path, name="TUD-Test", fps=7)

    records = read_records(
        rows, fmt="mot", fps=read_fps(rows), stream_start_ms=STREAM_START_MS
    )

    assert [record.key for record in records] == [b"TUD-Test"] * 3
    assert [record.timestamp_ms for record in records] == [
        STREAM_START_MS,
        STREAM_START_MS,
        STREAM_START_MS + round(7 * 1000 / 7),
    ]
    assert [record.value for record in records] == MOT_ROWS.splitlines()


def test_mot_frame_rate_defaults_to_25(tmp_path: Path) -> None:
    rows = make_mot_sequence(tmp_path, fps=None)

    assert read_fps(rows) == 25.0


def test_camera_option_overrides_the_default(tmp_path: Path) -> None:
    rows = make_mot_sequence(tmp_path)

    records = read_records(rows, fmt="mot", camera="PETS-cam")

    assert {record.key for record in records} == {b"PETS-cam"}


def test_default_camera_per_format(tmp_path: Path) -> None:
    flat = tmp_path / "TUD-Flat" / "det_frcnn_sort.txt"

    assert default_camera(flat, "mot") == "TUD-Flat"
    assert default_camera(DLSTREAMER_LINES, "dlstreamer") == (
        "dlstreamer-gvametapublish-lines"
    )
    assert default_camera(GARAGE, "deepstream") is None


def test_unified_lines_are_keyed_by_camera_id(tmp_path: Path) -> None:
    event = {"event_id": "e1", "camera_id": "till", "event_time_ms": NOW_MS}
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps(event) + b"\n")

    (record,) = read_records(path, fmt="unified")

    assert record == ReplayRecord(b"till", NOW_MS, orjson.dumps(event))


def test_malformed_lines_are_kept_as_they_are_and_blank_lines_skipped(
    tmp_path: Path,
) -> None:
    good = GARAGE.read_bytes().splitlines()[0]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b"\n\n{not json\n  \n[1, 2]\n\xff\xfe\n")

    records = read_records(path, fmt="deepstream")

    assert [record.value for record in records] == [
        good,
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
    ]
    assert [(r.key, r.timestamp_ms) for r in records[1:]] == [(None, None)] * 3


def test_malformed_mot_row_keeps_its_camera_but_has_no_time() -> None:
    record = to_record(b"frame,x,y", fmt="mot", camera="TUD-Stadtmitte")

    assert record == ReplayRecord(b"TUD-Stadtmitte", None, b"frame,x,y")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (GARAGE, "deepstream"),
        (TEST4, "deepstream"),
        (FRIGATE_RECORDS, "frigate"),
        (DLSTREAMER_LINES, "dlstreamer"),
    ],
)
def test_format_is_guessed_from_the_first_message(path: Path, expected: str) -> None:
    assert guess_format(read_payloads(path, fmt="")) == expected


def test_format_guess_reads_mot_and_unified(tmp_path: Path) -> None:
    unified = orjson.dumps({"event_id": "e", "camera_id": "c"})

    assert guess_format(MOT_ROWS.splitlines()) == "mot"
    assert guess_format([b"{broken", unified]) == "unified"


# -- duplicates and pacing ----------------------------------------------------


def test_duplicate_rate_is_met_with_a_seed() -> None:
    records = make_records(*range(20_000))

    plan = plan_sends(records, speed=None, duplicate_rate=0.2, seed=7)

    duplicates = sum(1 for send in plan if send.duplicate)
    spread = 4 * math.sqrt(20_000 * 0.2 * 0.8)
    assert abs(duplicates - 4_000) < spread
    assert plan == plan_sends(records, speed=None, duplicate_rate=0.2, seed=7)
    assert plan != plan_sends(records, speed=None, duplicate_rate=0.2, seed=8)


def test_a_duplicate_follows_its_original_byte_for_byte() -> None:
    records = make_records(*range(1_000))

    plan = plan_sends(records, speed=1.0, duplicate_rate=0.5, seed=1)

    for previous, send in zip(plan, plan[1:], strict=False):
        if send.duplicate:
            assert not previous.duplicate
            assert send.record == previous.record
            assert send.at_s == previous.at_s
    assert [send.record for send in plan if not send.duplicate] == records


@pytest.mark.parametrize(("rate", "expected"), [(0.0, 0), (1.0, 100)])
def test_duplicate_rate_bounds(rate: float, expected: int) -> None:
    plan = plan_sends(make_records(*range(100)), speed=None, duplicate_rate=rate)

    assert sum(1 for send in plan if send.duplicate) == expected


def test_pacing_follows_event_time_and_never_rewinds() -> None:
    records = make_records(1_000, 3_000, 2_000, None, 5_000)

    plan = plan_sends(records, speed=2.0)

    assert [send.at_s for send in plan] == [0.0, 1.0, 1.0, 1.0, 2.0]


def test_flat_out_sends_everything_at_once() -> None:
    plan = plan_sends(make_records(1_000, 90_000), speed=None)

    assert [send.at_s for send in plan] == [0.0, 0.0]


# -- rebasing -----------------------------------------------------------------


def test_rebase_moves_the_first_message_to_now_and_keeps_gaps() -> None:
    records = read_records(GARAGE, fmt="deepstream")[:200]

    rebased = rebase_records(records, fmt="deepstream", now_ms=NOW_MS)

    assert rebased[0].timestamp_ms == NOW_MS
    before_ms, after_ms = times_ms(records), times_ms(rebased)
    shift_ms = NOW_MS - before_ms[0]
    assert after_ms == [stamp + shift_ms for stamp in before_ms]
    for before, after in zip(records, rebased, strict=True):
        assert after.key == before.key
        assert to_record(after.value, fmt="deepstream") == after


def test_rebase_shifts_every_frigate_time() -> None:
    records = read_records(FRIGATE_RECORDS, fmt="frigate")

    rebased = rebase_records(records, fmt="frigate", now_ms=NOW_MS)

    shift_s = (NOW_MS - times_ms(records)[0]) / 1000
    before, after = orjson.loads(records[3].value), orjson.loads(rebased[3].value)
    assert after["start_time"] == pytest.approx(before["start_time"] + shift_s)
    assert after["end_time"] == pytest.approx(before["end_time"] + shift_s)
    assert rebased[0].timestamp_ms == NOW_MS


def test_rebase_shifts_unified_event_time() -> None:
    event = {"event_id": "e1", "camera_id": "till", "event_time_ms": 5_000}
    records = [to_record(orjson.dumps(event), fmt="unified")]

    (rebased,) = rebase_records(records, fmt="unified", now_ms=NOW_MS)

    assert orjson.loads(rebased.value)["event_time_ms"] == NOW_MS
    assert rebased.timestamp_ms == NOW_MS


def test_rebase_of_mot_moves_timestamps_only(tmp_path: Path) -> None:
    records = read_records(make_mot_sequence(tmp_path), fmt="mot", fps=7)

    rebased = rebase_records(records, fmt="mot", now_ms=NOW_MS)

    assert [record.value for record in rebased] == [r.value for r in records]
    assert [record.timestamp_ms for record in rebased] == [
        NOW_MS,
        NOW_MS,
        NOW_MS + 1_000,
    ]


def test_rebase_leaves_records_without_time_alone() -> None:
    records = [
        ReplayRecord(None, None, b"{broken"),
        *read_records(GARAGE, fmt="deepstream")[:2],
    ]

    rebased = rebase_records(records, fmt="deepstream", now_ms=NOW_MS)

    assert rebased[0] == records[0]
    assert rebased[1].timestamp_ms == NOW_MS


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_rebased_deepstream_time_reads_back_exactly(now_ms: int) -> None:
    record = to_record(TEST4.read_bytes(), fmt="deepstream")

    (rebased,) = rebase_records([record], fmt="deepstream", now_ms=now_ms)

    assert to_record(rebased.value, fmt="deepstream").timestamp_ms == now_ms


def test_replay_header_is_the_one_ingest_reads() -> None:
    from aggregator_app.ingest import REPLAY_HEADER as INGEST_HEADER

    assert REPLAY_HEADER == INGEST_HEADER
