"""Every real payload of the fixtures becomes events, or a stated rejection."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator_app.adapters import (
    ADAPTERS,
    Adapter,
    AdapterContext,
    JsonObject,
    adapter_for,
)
from aggregator_app.adapters.base import decode_object, stable_id
from aggregator_app.adapters.dlstreamer import camera_from_source
from aggregator_app.exceptions import ConfigError, RejectedEvent
from aggregator_app.schema import DetectorEvent
from rules.config import SourceConfig

FIXTURES = Path(__file__).parents[1] / "fixtures"
GARAGE = FIXTURES / "deepstream-360d-garage" / "demo-1.jsonl"
SAMPLES = FIXTURES / "payload-samples"
DLSTREAMER_LINES = SAMPLES / "dlstreamer" / "gvametapublish-lines.jsonl"
FRIGATE_RECORDS = SAMPLES / "frigate" / "events_front_door.json"
FRIGATE_DOCS = SAMPLES / "frigate" / "frigate-docs-mqtt.md"
TEST4 = SAMPLES / "deepstream" / "deepstream-test4-full-schema.json"

RECORD_TIME_MS = 1_700_000_000_000


def make_context(
    adapter: str,
    *,
    key: bytes | None = None,
    record_timestamp_ms: int | None = RECORD_TIME_MS,
    detector: str | None = None,
) -> AdapterContext:
    source = SourceConfig.model_validate(
        {
            "name": adapter,
            "topic": f"t.{adapter}",
            "adapter": adapter,
            "detector": detector,
        }
    )
    return AdapterContext(
        source=source, key=key, record_timestamp_ms=record_timestamp_ms
    )


def adapt(adapter: str, payload: bytes, **context: Any) -> list[DetectorEvent]:
    fields = adapter_for(adapter).to_events(payload, make_context(adapter, **context))
    return [DetectorEvent.model_validate(event) for event in fields]


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(RejectedEvent) as caught:
        call()
    return caught.value.reason


# --- registry and shared helpers ----------------------------------------------


def test_registry_has_one_adapter_per_configured_name() -> None:
    assert set(ADAPTERS) == {"deepstream", "frigate", "dlstreamer", "mot", "unified"}
    assert all(adapter_for(name).name == name for name in ADAPTERS)


def test_unknown_adapter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no adapter named"):
        adapter_for("onvif")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "broken_json"),
        (b"\xff\xfe", "broken_json"),
        (b'{"a": 1} trailing', "broken_json"),
        (b'{"confidence": NaN}', "non_finite_number"),
        (b'{"x": -Infinity}', "non_finite_number"),
        (b'{"x": 1e999}', "non_finite_number"),
        (b"[1, 2]", "wrong_type"),
        (b'"text"', "wrong_type"),
        (b"null", "wrong_type"),
    ],
)
def test_decode_object_rejects(payload: bytes, reason: str) -> None:
    assert reason_of(lambda: decode_object(payload)) == reason


def test_nan_inside_a_string_is_not_called_a_nan_literal() -> None:
    assert reason_of(lambda: decode_object(b'{"label": "NaN", ')) == "broken_json"


# --- DeepStream: the garage ---------------------------------------------------


@pytest.fixture(scope="module")
def garage_events() -> list[DetectorEvent]:
    events: list[DetectorEvent] = []
    for line in GARAGE.read_bytes().splitlines():
        events.extend(adapt("deepstream", line))
    return events


def test_every_garage_line_gives_one_event(garage_events: list[DetectorEvent]) -> None:
    assert len(GARAGE.read_bytes().splitlines()) == 3028
    assert len(garage_events) == 3028
    assert len({event.event_id for event in garage_events}) == 3028


def test_garage_counts(garage_events: list[DetectorEvent]) -> None:
    event_types = collections.Counter(
        event.attributes["event_type"] for event in garage_events
    )
    zone_kinds = collections.Counter(
        event.attributes["zone_kind"] for event in garage_events
    )

    assert event_types == {"moving": 3003, "parked": 18, "empty": 7}
    assert zone_kinds == {"aisle": 3003, "parking_spot": 25}
    assert len({event.camera_id for event in garage_events}) == 51
    assert len({event.tracker_id for event in garage_events}) == 92
    assert {event.site_id for event in garage_events} == {"endeavor"}
    assert {event.detector for event in garage_events} == {"vehicle"}
    assert {event.label for event in garage_events} == {"vehicle"}


def test_garage_fields(garage_events: list[DetectorEvent]) -> None:
    first = garage_events[0]

    assert first.event_id == "b88ad627-2b31-45ef-a8e4-5c68b7bb950b_end-aigarage-01"
    assert first.camera_id == "10_110_127_110_A1"
    assert first.event_time_ms == 1_536_772_838_026
    assert first.zone_id == "C_127_110"
    assert first.tracker_id == "^S10_110_127_110_A1_^O1"
    assert first.bbox is None  # no frame size in the payload: ingest's job
    assert first.bbox_px is not None
    assert first.bbox_px.center() == (576.0, 44.5)
    assert first.position is not None
    assert first.position.x_m == pytest.approx(-54.3318176)
    assert first.attributes["licence"] == "UNK-M-0"
    assert all(event.position is not None for event in garage_events)


def test_garage_confidences_are_not_scores(garage_events: list[DetectorEvent]) -> None:
    # The garage writes 0.0 on every moving vehicle and 1 on parked/empty spots.
    by_type = collections.Counter(
        (event.attributes["event_type"], event.confidence) for event in garage_events
    )

    assert by_type == {("moving", 0.0): 3003, ("parked", 1.0): 18, ("empty", 1.0): 7}


def test_garage_is_out_of_order_in_file_order(
    garage_events: list[DetectorEvent],
) -> None:
    times_ms = [event.event_time_ms for event in garage_events]
    inversions = sum(1 for a, b in zip(times_ms, times_ms[1:], strict=False) if b < a)

    assert inversions == 648


# --- DeepStream: the test4 sample ---------------------------------------------


def test_deepstream_test4_sample() -> None:
    (event,) = adapt("deepstream", TEST4.read_bytes())

    assert event.event_id == "ff7cc527-d019-4348-8b25-6df69c5b6dcc"
    assert event.camera_id == "CAMERA_ID"
    assert event.site_id == "XYZ"
    assert event.zone_id == "walsh"
    assert event.event_time_ms == 1_617_221_467_742
    assert event.detector == "vehicle"
    assert event.label == "sedan"
    assert event.confidence is None  # -0.1: DeepStream's "not set"
    assert event.tracker_id is None  # "-1": not tracked
    assert event.position is None  # all zeros: no position
    assert event.bbox_px is not None
    assert (event.bbox_px.x_min, event.bbox_px.y_max) == (597, 569)
    assert event.attributes["licence"] == "XX1234"
    assert event.attributes["make"] == "Bugatti"


@pytest.mark.parametrize(
    ("kind", "details", "detector", "label"),
    [
        ("person", {"age": 30, "confidence": 0.8}, "person", "person"),
        ("face", {"gender": "f"}, "face", "face"),
        ("vehicle", {"type": ""}, "vehicle", "vehicle"),
        ("bicycle", {}, "object", "object"),
    ],
)
def test_deepstream_object_kinds(
    kind: str, details: JsonObject, detector: str, label: str
) -> None:
    message = orjson.loads(TEST4.read_bytes())
    del message["object"]["vehicle"]
    message["object"][kind] = details

    (event,) = adapt("deepstream", orjson.dumps(message))

    assert (event.detector, event.label) == (detector, label)


def test_deepstream_object_level_confidence_wins() -> None:
    message = orjson.loads(TEST4.read_bytes())
    message["object"]["confidence"] = 0.42

    (event,) = adapt("deepstream", orjson.dumps(message))

    assert event.confidence == 0.42


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("messageid",), None, "missing_field"),
        (("@timestamp",), None, "missing_field"),
        (("@timestamp",), "soon", "bad_timestamp"),
        (("sensor",), None, "missing_field"),
        (("sensor",), "CAMERA_ID", "wrong_type"),
        (("sensor", "id"), 7, "wrong_type"),
        (("object",), None, "missing_field"),
        (("object", "bbox"), [1, 2, 3, 4], "wrong_type"),
        (("object", "confidence"), "high", "wrong_type"),
        (("place", "name"), 1, "wrong_type"),
    ],
)
def test_deepstream_rejects(path: tuple[str, ...], value: object, reason: str) -> None:
    message = orjson.loads(TEST4.read_bytes())
    *parents, last = path
    holder = message
    for key in parents:
        holder = holder[key]
    if value is None:
        del holder[last]
    else:
        holder[last] = value

    assert reason_of(lambda: adapt("deepstream", orjson.dumps(message))) == reason


# --- Frigate ------------------------------------------------------------------


def test_every_frigate_api_record_gives_one_event() -> None:
    records = json.loads(FRIGATE_RECORDS.read_text())
    events = [event for record in records for event in adapt("frigate", _dump(record))]

    assert len(records) == len(events) == 50
    for record, event in zip(records, events, strict=True):
        assert event.event_id == event.tracker_id == record["id"]
        assert event.camera_id == "front_door"
        assert event.detector == "person"
        assert event.event_time_ms == round(record["start_time"] * 1000)
        assert event.confidence == record["data"]["top_score"]
        assert event.attributes["end_time_ms"] == round(record["end_time"] * 1000)
    zones = collections.Counter(event.zone_id for event in events)
    assert zones == {None: 45, "bench": 5}


def test_frigate_false_positive_gives_no_event() -> None:
    record = json.loads(FRIGATE_RECORDS.read_text())[0]
    record["false_positive"] = True

    assert adapt("frigate", _dump(record)) == []


def test_frigate_relative_box_of_newer_api() -> None:
    record = json.loads(FRIGATE_RECORDS.read_text())[0]
    record["data"]["box"] = [0.25, 0.5, 0.25, 0.5]

    (event,) = adapt("frigate", _dump(record))

    assert event.bbox is not None
    assert (event.bbox.x_max, event.bbox.y_max) == (0.5, 1.0)


def frigate_doc_messages() -> list[JsonObject]:
    """Return every JSON example of Frigate's MQTT reference, comments removed."""
    blocks = re.findall(r"```json\n(.*?)```", FRIGATE_DOCS.read_text(), re.DOTALL)
    return [json.loads(_strip_comments(block)) for block in blocks]


def _strip_comments(block: str) -> str:
    kept = []
    for line in block.splitlines():
        for match in re.finditer("//", line):
            if line[: match.start()].count('"') % 2 == 0:  # not inside a string
                line = line[: match.start()]
                break
        kept.append(line)
    return "\n".join(kept)


def test_frigate_mqtt_documentation_examples() -> None:
    outcomes: list[str] = []
    for message in frigate_doc_messages():
        try:
            events = adapt("frigate", _dump(message))
        except RejectedEvent as exc:
            outcomes.append(exc.reason)
        else:
            outcomes.append(f"{len(events)} event")

    # frigate/events, 4 tracked_object_update kinds, frigate/reviews (a review
    # has no label), frigate/triggers.
    assert outcomes == [
        "1 event",
        "wrong_type",
        "wrong_type",
        "wrong_type",
        "wrong_type",
        "wrong_type",
        "missing_field",
        "wrong_type",
    ]


def test_frigate_mqtt_event_uses_after() -> None:
    message = frigate_doc_messages()[0]

    (event,) = adapt("frigate", _dump(message))

    assert event.event_id == event.tracker_id == "1607123955.475377-mxklsc"
    assert event.event_time_ms == 1_607_123_962_083  # after.frame_time
    assert event.confidence == 0.87890625  # after.score
    assert event.zone_id == "yard"
    assert event.bbox_px is not None
    assert (event.bbox_px.x_min, event.bbox_px.y_max) == (432, 854)
    assert event.attributes["sub_label"] == "John Smith"
    assert event.attributes["message_type"] == "update"
    assert event.attributes["recognized_license_plate"] == "ABC12345"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "gone"}, "wrong_type"),
        ({"type": ["new"]}, "wrong_type"),
        ({"after": None}, "missing_field"),
        ({"after": []}, "wrong_type"),
    ],
)
def test_frigate_mqtt_rejects(change: JsonObject, reason: str) -> None:
    message = frigate_doc_messages()[0] | change

    assert reason_of(lambda: adapt("frigate", _dump(message))) == reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": None}, "missing_field"),
        ({"label": None}, "missing_field"),
        ({"camera": 5}, "wrong_type"),
        ({"start_time": None}, "missing_field"),
        ({"start_time": True}, "bad_timestamp"),
        ({"data": {"top_score": "0.7"}}, "wrong_type"),
        ({"data": {"box": [0, 0, 1]}}, "wrong_type"),
    ],
)
def test_frigate_api_rejects(change: JsonObject, reason: str) -> None:
    record = json.loads(FRIGATE_RECORDS.read_text())[0] | change

    assert reason_of(lambda: adapt("frigate", _dump(record))) == reason


# --- DL Streamer --------------------------------------------------------------


def test_every_dlstreamer_line_gives_one_event_per_object() -> None:
    lines = DLSTREAMER_LINES.read_bytes().splitlines()

    per_line = [adapt("dlstreamer", line) for line in lines]

    assert len(lines) == 12
    assert [len(events) for events in per_line] == [1] * 12
    labels = collections.Counter(events[0].label for events in per_line)
    assert labels == {"person": 8, "vehicle": 4}


def test_dlstreamer_person_lines() -> None:
    events = [
        event
        for line in DLSTREAMER_LINES.read_bytes().splitlines()
        for event in adapt("dlstreamer", line)
        if event.label == "person"
    ]

    offsets_ns = {event.attributes["stream_offset_ns"] for event in events}
    assert offsets_ns == {
        1_500_000_000,
        1_666_666_666,
        1_750_000_000,
        1_833_333_333,
        1_916_666_666,
        2_000_000_000,
        2_083_333_333,
        2_166_666_666,
    }
    assert {event.detector for event in events} == {"person"}
    assert {event.event_time_ms for event in events} == {RECORD_TIME_MS}
    assert len({event.camera_id for event in events}) == 1
    assert len({event.event_id for event in events}) == 8
    for event in events:
        assert event.bbox is not None and event.bbox_px is not None
        assert 0.67 < event.bbox.x_min < 0.69  # x ~ 517..528 px of 768
        assert event.confidence is not None and 0.5 < event.confidence < 1


def test_dlstreamer_camera_and_ids_are_stable() -> None:
    line = DLSTREAMER_LINES.read_bytes().splitlines()[0]

    (from_source,) = adapt("dlstreamer", line)
    (again,) = adapt("dlstreamer", line, record_timestamp_ms=RECORD_TIME_MS + 5)
    (from_key,) = adapt("dlstreamer", line, key=b"lobby-cam")

    assert from_source.camera_id.startswith("dlstreamer-person-bicycle-car-detection-")
    assert again.event_id == from_source.event_id
    assert from_key.camera_id == "lobby-cam"
    assert from_key.event_id != from_source.event_id


def test_camera_from_source_is_short_and_distinct() -> None:
    first = camera_from_source("rtsp://10.0.0.1/stream")
    second = camera_from_source("rtsp://10.0.0.2/stream")

    assert first != second
    assert first.startswith("dlstreamer-stream-")
    assert camera_from_source("") == camera_from_source("")
    assert camera_from_source("http://[bad").startswith("dlstreamer-")


def test_dlstreamer_several_objects_in_one_line() -> None:
    line = orjson.loads(DLSTREAMER_LINES.read_bytes().splitlines()[0])
    line["objects"] = line["objects"] * 3

    events = adapt("dlstreamer", orjson.dumps(line))

    assert len(events) == 3
    assert [event.attributes["object_index"] for event in events] == [0, 1, 2]
    assert len({event.event_id for event in events}) == 3


def test_dlstreamer_line_without_objects_gives_no_event() -> None:
    assert adapt("dlstreamer", b'{"objects": [], "timestamp": 5}') == []


@pytest.mark.parametrize(
    ("change", "context", "reason"),
    [
        ({}, {"record_timestamp_ms": None}, "missing_time"),
        ({"timestamp": None}, {}, "missing_field"),
        ({"timestamp": 1.5}, {}, "wrong_type"),
        ({"timestamp": -1}, {}, "bad_timestamp"),
        ({"objects": {}}, {}, "wrong_type"),
        ({"objects": [1]}, {}, "wrong_type"),
        ({"objects": [{"x": 1}]}, {}, "missing_field"),
        ({}, {"key": b"\xff"}, "wrong_type"),
    ],
)
def test_dlstreamer_rejects(
    change: JsonObject, context: dict[str, Any], reason: str
) -> None:
    line = orjson.loads(DLSTREAMER_LINES.read_bytes().splitlines()[0]) | change
    payload = orjson.dumps({k: v for k, v in line.items() if v is not None})

    assert reason_of(lambda: adapt("dlstreamer", payload, **context)) == reason


# --- MOT (rows written here: the MOT15 data may not be copied into the repo) --


def test_mot_detection_row() -> None:
    row = b"12,-1,310.5,152.0,40.25,110.0,0.93,-1,-1,-1"

    (event,) = adapt("mot", row, key=b"TUD-Stadtmitte", detector="person")

    assert event.camera_id == "TUD-Stadtmitte"
    assert event.event_time_ms == RECORD_TIME_MS
    assert event.detector == "person" and event.label == "person"
    assert event.confidence == 0.93
    assert event.tracker_id is None
    assert event.position is None
    assert event.bbox_px is not None
    assert (event.bbox_px.x_max, event.bbox_px.y_max) == (350.75, 262.0)
    assert event.attributes == {"frame": 12}
    assert event.event_id == stable_id(
        "TUD-Stadtmitte", 12.0, -1.0, 310.5, 152.0, 40.25, 110.0, 0.93, -1.0, -1.0, -1.0
    )


def test_mot_ground_truth_row_with_world_position() -> None:
    row = b"3,7,100,50,20,60,1,1.25,-3.5,-1\n"

    (event,) = adapt("mot", row, key=b"TUD-Stadtmitte")

    assert event.tracker_id == "7"
    assert event.position is not None
    assert (event.position.x_m, event.position.y_m, event.position.z_m) == (
        1.25,
        -3.5,
        0.0,
    )


def test_mot_redelivered_row_keeps_its_id() -> None:
    row = b"12,-1,310.5,152,40.25,110,0.93,-1,-1,-1"

    first = adapt("mot", row, key=b"TUD-Campus")[0].event_id
    again = adapt("mot", b" " + row + b" ", key=b"TUD-Campus")[0].event_id
    other = adapt("mot", row, key=b"TUD-Stadtmitte")[0].event_id

    assert first == again != other


@pytest.mark.parametrize(
    ("row", "context", "reason"),
    [
        (b"1,-1,1,2,3,4,0.9,-1,-1,-1", {"key": None}, "unknown_camera"),
        (b"1,-1,1,2,3,4,0.9,-1,-1,-1", {"record_timestamp_ms": None}, "missing_time"),
        (b"1,-1,1,2,3,4", {}, "broken_csv"),
        (b"1,-1,1,2,3,4,0.9,-1,-1,-1,9", {}, "broken_csv"),
        (b"one,-1,1,2,3,4,0.9", {}, "broken_csv"),
        (b"0,-1,1,2,3,4,0.9", {}, "broken_csv"),
        (b"1.5,-1,1,2,3,4,0.9", {}, "broken_csv"),
        (b"1,2.5,1,2,3,4,0.9", {}, "broken_csv"),
        (b"1,-1,1,2,3,4,0.9\xff", {}, "broken_csv"),
        (b"1,-1,nan,2,3,4,0.9", {}, "non_finite_number"),
        (b"1,-1,1,2,3,4,inf", {}, "non_finite_number"),
    ],
)
def test_mot_rejects(row: bytes, context: dict[str, Any], reason: str) -> None:
    context = {"key": b"TUD-Campus"} | context

    assert reason_of(lambda: adapt("mot", row, **context)) == reason


def test_mot_confidence_above_one_fails_validation() -> None:
    fields = adapter_for("mot").to_events(
        b"1,-1,1,2,3,4,31.5", make_context("mot", key=b"TUD-Campus")
    )

    assert fields[0]["confidence"] == 31.5  # ingest rejects it when validating


# --- unified ------------------------------------------------------------------


def test_unified_payload_passes_through() -> None:
    event = adapt("deepstream", TEST4.read_bytes())[0]

    (again,) = adapt("unified", event.model_dump_json().encode())

    assert again == event


# --- robustness: mutated real payloads ----------------------------------------

REAL_PAYLOADS: dict[str, bytes] = {
    "deepstream": GARAGE.read_bytes().splitlines()[2],
    "frigate": FRIGATE_RECORDS.read_bytes(),
    "frigate_mqtt": orjson.dumps(frigate_doc_messages()[0]),
    "dlstreamer": DLSTREAMER_LINES.read_bytes().splitlines()[0],
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300)
@given(data=st.data())
@pytest.mark.parametrize("adapter_name", sorted(REAL_PAYLOADS))
def test_property_mutated_payloads_only_reject(
    adapter_name: str, data: st.DataObject
) -> None:
    document = orjson.loads(REAL_PAYLOADS[adapter_name])
    if isinstance(document, list):
        document = document[0]
    _mutate(document, data)
    adapter: Adapter = adapter_for(adapter_name.removesuffix("_mqtt"))

    try:
        adapter.to_events(orjson.dumps(document), make_context(adapter.name))
    except RejectedEvent as exc:
        assert exc.reason and exc.detail


def _mutate(document: JsonObject, data: st.DataObject) -> None:
    holder: Any = document
    while True:
        key = data.draw(st.sampled_from(sorted(holder)))
        if isinstance(holder[key], dict) and holder[key] and data.draw(st.booleans()):
            holder = holder[key]
            continue
        holder[key] = data.draw(json_values)
        return


def _dump(value: object) -> bytes:
    return orjson.dumps(value)
