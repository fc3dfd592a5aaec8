"""The per-record ingest step: every reject reason, skew, cameras, enrichment."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator_app.adapters import ADAPTERS, Adapter, AdapterContext, JsonObject
from aggregator_app.exceptions import RejectedEvent
from aggregator_app.ingest import RawRecord, dead_letter_headers, parse_record
from aggregator_app.schema import DetectorEvent
from aggregator_app.timeparse import to_epoch_ms
from rules.config import RulesConfig, SourceConfig, load_rules

REPO = Path(__file__).parents[2]
GARAGE = REPO / "tests" / "fixtures" / "deepstream-360d-garage" / "demo-1.jsonl"
SAMPLES = REPO / "tests" / "fixtures" / "payload-samples"
NOW_MS = 1_700_000_000_000
SKEW_MS = 300_000


def make_rules(**ingest: Any) -> RulesConfig:
    return RulesConfig.model_validate(
        {
            "version": 1,
            "ingest": {"max_clock_skew_s": SKEW_MS / 1000} | ingest,
            "sources": [
                {"name": name, "topic": f"detections.{name}", "adapter": name}
                for name in ("deepstream", "frigate", "unified")
            ]
            + [
                {
                    "name": "mot",
                    "topic": "detections.mot",
                    "adapter": "mot",
                    "site_id": "lab",
                    "detector": "person",
                },
                {
                    "name": "dlstreamer",
                    "topic": "detections.dlstreamer",
                    "adapter": "dlstreamer",
                    "site_id": "lab",
                },
            ],
            "sites": {
                "home": {"name": "Front door"},
                "lab": {"name": "Lab", "camera_id_pattern": "(TUD|dlstreamer).*"},
                "shop": {
                    "name": "Shop",
                    "camera_id_pattern": r"shop-\d+",
                    "frame_width_px": 1000,
                    "frame_height_px": 500,
                },
            },
            "cameras": {
                "front_door": {"site_id": "home", "zone_id": "entrance"},
                "till": {
                    "site_id": "shop",
                    "zone_id": "till",
                    "frame_width_px": 640,
                    "frame_height_px": 480,
                },
            },
        }
    )


RULES = make_rules()


def source(name: str, rules: RulesConfig = RULES) -> SourceConfig:
    return next(item for item in rules.sources if item.name == name)


def make_record(
    value: bytes | None,
    *,
    key: bytes | None = None,
    timestamp_ms: int | None = NOW_MS,
    replayed: bool = False,
) -> RawRecord:
    return RawRecord(
        value=value,
        key=key,
        topic="detections.unified",
        partition=3,
        offset=41,
        timestamp_ms=timestamp_ms,
        replayed=replayed,
    )


def make_event(**changes: Any) -> JsonObject:
    event: JsonObject = {
        "event_id": "e-1",
        "detector": "person",
        "source": "unified",
        "camera_id": "front_door",
        "event_time_ms": NOW_MS,
        "label": "person",
        "confidence": 0.9,
    }
    event.update(changes)
    return {name: value for name, value in event.items() if value is not None}


def ingest(
    value: bytes | None,
    *,
    source_name: str = "unified",
    rules: RulesConfig = RULES,
    now_ms: int = NOW_MS,
    **record: Any,
) -> list[DetectorEvent]:
    return parse_record(
        make_record(value, **record),
        source=source(source_name, rules),
        rules=rules,
        now_ms=now_ms,
    )


def rejection(value: bytes | None, **kwargs: Any) -> RejectedEvent:
    with pytest.raises(RejectedEvent) as caught:
        ingest(value, **kwargs)
    return caught.value


# --- the real data ------------------------------------------------------------


def test_whole_garage_replayed_through_the_real_rules() -> None:
    rules = load_rules(REPO / "config" / "aggregation-rules.yml")
    deepstream = next(item for item in rules.sources if item.adapter == "deepstream")
    events: list[DetectorEvent] = []

    for offset, line in enumerate(GARAGE.read_bytes().splitlines()):
        stamp = orjson.loads(line)["@timestamp"]
        record = dataclasses.replace(
            make_record(line, replayed=True),
            offset=offset,
            timestamp_ms=to_epoch_ms(stamp, naive="utc") + 250,
        )
        events.extend(parse_record(record, source=deepstream, rules=rules, now_ms=0))

    assert len(events) == 3028
    assert {event.site_id for event in events} == {"endeavor"}


def test_payload_samples_through_the_real_rules() -> None:
    rules = load_rules(REPO / "config" / "aggregation-rules.yml")
    records = json.loads((SAMPLES / "frigate" / "events_front_door.json").read_text())
    frigate = [
        ingest(
            orjson.dumps(item),
            source_name="frigate",
            rules=rules,
            timestamp_ms=round(item["start_time"] * 1000),
            replayed=True,
        )
        for item in records
    ]
    lines = (SAMPLES / "dlstreamer" / "gvametapublish-lines.jsonl").read_bytes()
    dlstreamer = [
        ingest(line, source_name="dlstreamer", rules=rules)
        for line in lines.splitlines()
    ]
    test4 = (SAMPLES / "deepstream" / "deepstream-test4-full-schema.json").read_bytes()

    assert [len(events) for events in frigate] == [1] * 50
    assert {(e[0].site_id, e[0].zone_id) for e in frigate} == {
        ("home", "entrance"),
        ("home", "bench"),
    }
    assert [len(events) for events in dlstreamer] == [1] * 12
    assert {events[0].site_id for events in dlstreamer} == {"lab"}
    error = rejection(test4, source_name="deepstream", rules=rules)
    assert (error.reason, error.detail) == ("unknown_camera", "camera 'CAMERA_ID'")


def test_garage_live_is_rejected_as_clock_skew() -> None:
    line = GARAGE.read_bytes().splitlines()[0]
    rules = make_rules(allow_unknown_cameras=True)

    error = rejection(line, source_name="deepstream", rules=rules)

    assert error.reason == "clock_skew"


# --- every reject reason ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"{", "broken_json"),
        (b'{"event_id": "e", "confidence": NaN}', "non_finite_number"),
        (b'{"confidence": Infinity', "non_finite_number"),
        (b'{"confidence": 1e400}', "non_finite_number"),
        (b"[]", "wrong_type"),
        (orjson.dumps(make_event(confidence="high")), "wrong_type"),
        (orjson.dumps(make_event(event_time_ms="soon")), "wrong_type"),
        (orjson.dumps(make_event(attributes=[1])), "wrong_type"),
        (orjson.dumps(make_event(attributes={"nested": {"a": 1}})), "wrong_type"),
        (orjson.dumps(make_event(camera_id=None)), "missing_field"),
        (orjson.dumps(make_event(event_id=None)), "missing_field"),
        (orjson.dumps(make_event(colour="red")), "unknown_field"),
        (orjson.dumps(make_event(detector="dog")), "unknown_detector"),
        (orjson.dumps(make_event(confidence=1.5)), "confidence_out_of_range"),
        (orjson.dumps(make_event(confidence=-0.1)), "confidence_out_of_range"),
        (
            orjson.dumps(
                make_event(bbox_px={"x_min": 5, "y_min": 0, "x_max": 1, "y_max": 1})
            ),
            "bad_bbox",
        ),
        (
            orjson.dumps(
                make_event(bbox={"x_min": 0, "y_min": 0, "x_max": 1.5, "y_max": 1})
            ),
            "bad_bbox",
        ),
        (orjson.dumps(make_event(event_time_ms=-1)), "bad_timestamp"),
        (orjson.dumps(make_event(schema_version=2)), "wrong_schema_version"),
        (orjson.dumps(make_event(event_id="")), "invalid_field"),
        (orjson.dumps(make_event(camera_id="mystery")), "unknown_camera"),
        (orjson.dumps(make_event(event_time_ms=NOW_MS + SKEW_MS + 1)), "clock_skew"),
    ],
)
def test_reject_reasons(value: bytes | None, reason: str) -> None:
    error = rejection(value)

    assert error.reason == reason
    assert error.detail


def test_too_large_is_checked_before_parsing() -> None:
    rules = make_rules(max_payload_bytes=64)
    at_limit = orjson.dumps(make_event()).ljust(64)[:64]

    assert rejection(b"{" * 65, rules=rules).reason == "too_large"
    assert rejection(at_limit, rules=rules).reason != "too_large"


def test_source_specific_reasons() -> None:
    dlstreamer_line = b'{"objects": [], "timestamp": 5}'

    assert (
        rejection(b"1,-1,1,2", source_name="mot", key=b"TUD-1").reason == "broken_csv"
    )
    assert (
        rejection(dlstreamer_line, source_name="dlstreamer", timestamp_ms=None).reason
        == "missing_time"
    )
    assert rejection(b"{}", source_name="deepstream").reason == "missing_field"


class _FakeAdapter(Adapter):
    name = "unified"

    def __init__(self, result: list[JsonObject] | Exception) -> None:
        self.result = result

    def to_events(self, payload: bytes, context: AdapterContext) -> list[JsonObject]:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    "changes",
    [{"confidence": math.nan}, {"attributes": {"speed": math.inf}}],
    ids=["confidence", "attribute"],
)
def test_non_finite_numbers_from_an_adapter(
    monkeypatch: pytest.MonkeyPatch, changes: JsonObject
) -> None:
    monkeypatch.setitem(ADAPTERS, "unified", _FakeAdapter([make_event(**changes)]))

    assert rejection(b"x").reason == "non_finite_number"


def test_adapter_bug_costs_one_record(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(ADAPTERS, "unified", _FakeAdapter(KeyError("object")))

    error = rejection(b"x")

    assert error.reason == "adapter_error"
    assert "adapter failed on a record: adapter=unified" in caplog.text


# --- clock skew ---------------------------------------------------------------


@pytest.mark.parametrize("skew_ms", [-SKEW_MS, 0, SKEW_MS])
def test_skew_at_the_limit_is_accepted(skew_ms: int) -> None:
    value = orjson.dumps(make_event(event_time_ms=NOW_MS + skew_ms))

    assert len(ingest(value)) == 1


@pytest.mark.parametrize("skew_ms", [-SKEW_MS - 1, SKEW_MS + 1])
def test_skew_beyond_the_limit_is_rejected(skew_ms: int) -> None:
    value = orjson.dumps(make_event(event_time_ms=NOW_MS + skew_ms))

    assert rejection(value).reason == "clock_skew"


def test_replayed_record_is_measured_against_its_own_timestamp() -> None:
    recorded_ms = NOW_MS - 86_400_000
    value = orjson.dumps(make_event(event_time_ms=recorded_ms + 1000))

    assert rejection(value, timestamp_ms=recorded_ms).reason == "clock_skew"
    assert len(ingest(value, timestamp_ms=recorded_ms, replayed=True)) == 1


def test_replayed_record_without_timestamp_falls_back_to_the_clock() -> None:
    value = orjson.dumps(make_event(event_time_ms=NOW_MS - 86_400_000))

    error = rejection(value, timestamp_ms=None, replayed=True)

    assert error.reason == "clock_skew"


# --- cameras and enrichment ---------------------------------------------------


def test_unknown_camera_allowed_by_the_rules() -> None:
    rules = make_rules(allow_unknown_cameras=True)
    value = orjson.dumps(make_event(camera_id="mystery"))

    (event,) = ingest(value, rules=rules)

    assert event.camera_id == "mystery"
    assert event.site_id is None


def test_unknown_camera_takes_the_site_of_its_source() -> None:
    rules = make_rules(allow_unknown_cameras=True)

    (event,) = ingest(b"1,-1,1,2,3,4,0.9", source_name="mot", key=b"X", rules=rules)

    assert event.site_id == "lab"


def test_site_and_zone_from_the_camera() -> None:
    (event,) = ingest(orjson.dumps(make_event()))
    (own,) = ingest(orjson.dumps(make_event(site_id="elsewhere", zone_id="porch")))

    assert (event.site_id, event.zone_id) == ("home", "entrance")
    assert (own.site_id, own.zone_id) == ("elsewhere", "porch")


def test_camera_by_site_pattern() -> None:
    (event,) = ingest(b"1,-1,1,2,3,4,0.9", source_name="mot", key=b"TUD-Campus")

    assert event.site_id == "lab"
    assert event.bbox is None  # the lab declares no frame size


@pytest.mark.parametrize(
    ("camera_id", "expected"),
    [
        ("till", (0.15625, 0.125, 0.3125, 1.0)),  # 640x480, clamped at the bottom
        ("shop-7", (0.1, 0.12, 0.2, 1.0)),  # the site's 1000x500
    ],
)
def test_pixel_box_is_normalised_by_the_frame_size(
    camera_id: str, expected: tuple[float, ...]
) -> None:
    box_px = {"x_min": 100, "y_min": 60, "x_max": 200, "y_max": 520}
    value = orjson.dumps(make_event(camera_id=camera_id, bbox_px=box_px))

    (event,) = ingest(value)

    assert event.bbox is not None
    bbox = (event.bbox.x_min, event.bbox.y_min, event.bbox.x_max, event.bbox.y_max)
    assert bbox == pytest.approx(expected)
    assert event.bbox_px is not None and event.bbox_px.y_max == 520


def test_a_given_normalised_box_is_kept() -> None:
    box = {"x_min": 0.5, "y_min": 0.5, "x_max": 0.6, "y_max": 0.6}
    box_px = {"x_min": 0, "y_min": 0, "x_max": 10, "y_max": 10}
    value = orjson.dumps(make_event(camera_id="till", bbox=box, bbox_px=box_px))

    (event,) = ingest(value)

    assert event.bbox is not None and event.bbox.x_min == 0.5


def test_camera_lookups_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = make_rules()
    calls: list[str] = []
    original = RulesConfig.camera

    def counting(self: RulesConfig, camera_id: str) -> Any:
        calls.append(camera_id)
        return original(self, camera_id)

    monkeypatch.setattr(RulesConfig, "camera", counting)
    for _ in range(3):
        ingest(orjson.dumps(make_event()), rules=rules)
        rejection(orjson.dumps(make_event(camera_id="mystery")), rules=rules)

    assert calls == ["front_door", "mystery"]


def test_several_events_of_one_record() -> None:
    line = orjson.dumps(
        {
            "objects": [
                {"detection": {"label": "person", "confidence": 0.5}},
                {"detection": {"label": "vehicle", "confidence": 0.6}},
            ],
            "timestamp": 40_000_000,
        }
    )

    events = ingest(line, source_name="dlstreamer", key=b"dlstreamer-door")

    assert [event.detector for event in events] == ["person", "vehicle"]
    assert {event.site_id for event in events} == {"lab"}


# --- records and dead letters -------------------------------------------------


def test_raw_record_is_frozen() -> None:
    record = make_record(b"x")

    with pytest.raises(dataclasses.FrozenInstanceError):
        record.offset = 0  # type: ignore[misc]  # the point of the test


def test_dead_letter_headers() -> None:
    record = make_record(b"{")
    error = RejectedEvent("broken_json", "odd: " + "é" * 2000)  # 5 + 2n bytes

    headers = dict(dead_letter_headers(record, error))

    assert headers["dead-letter-reason"] == b"broken_json"
    detail = headers["dead-letter-detail"].decode("utf-8")  # whole characters only
    assert detail == "odd: " + "é" * 509
    assert headers["dead-letter-source-topic"] == b"detections.unified"
    assert headers["dead-letter-source-partition"] == b"3"
    assert headers["dead-letter-source-offset"] == b"41"


# --- properties ---------------------------------------------------------------

SOURCES = ["deepstream", "frigate", "dlstreamer", "mot", "unified"]


@settings(max_examples=400)
@given(
    value=st.binary(max_size=300),
    key=st.none() | st.binary(max_size=12),
    source_name=st.sampled_from(SOURCES),
    replayed=st.booleans(),
)
def test_property_arbitrary_bytes_only_reject(
    value: bytes, key: bytes | None, source_name: str, replayed: bool
) -> None:
    _only_rejects(value, key=key, source_name=source_name, replayed=replayed)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    changes=st.dictionaries(
        st.sampled_from([*DetectorEvent.model_fields, "extra"]), json_values, max_size=3
    ),
    source_name=st.sampled_from(SOURCES),
)
def test_property_arbitrary_event_objects_only_reject(
    changes: JsonObject, source_name: str
) -> None:
    value = orjson.dumps(make_event() | changes)

    _only_rejects(value, key=b"TUD-1", source_name=source_name, replayed=False)


def _only_rejects(
    value: bytes, *, key: bytes | None, source_name: str, replayed: bool
) -> None:
    try:
        events = ingest(value, key=key, source_name=source_name, replayed=replayed)
    except RejectedEvent as exc:
        assert exc.reason != "adapter_error", exc.detail
    else:
        assert all(isinstance(event, DetectorEvent) for event in events)
