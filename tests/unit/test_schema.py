"""The published JSON Schema is current, and events survive a JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregator_app.schema import (
    AggregatedEvent,
    BBox,
    DetectorEvent,
    DetectorKind,
    GroundPoint,
    NormalisedBBox,
    json_schema,
)

SCHEMA_FILE = Path(__file__).parents[2] / "docs" / "event-schema.json"


def test_docs_schema_is_generated_from_the_models() -> None:
    published = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))

    assert published == json.loads(json.dumps(json_schema())), (
        "docs/event-schema.json is stale: regenerate it with "
        "`python -m aggregator_app.schema > docs/event-schema.json`"
    )


finite = st.floats(allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0.0, max_value=1.0)
identifiers = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
)


@st.composite
def boxes(draw: st.DrawFn, coordinate: st.SearchStrategy[float]) -> dict[str, float]:
    x_min, x_max = sorted((draw(coordinate), draw(coordinate)))
    y_min, y_max = sorted((draw(coordinate), draw(coordinate)))
    return {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}


attribute_values = st.none() | st.booleans() | st.integers() | finite | st.text()

events = st.builds(
    DetectorEvent,
    event_id=identifiers,
    detector=st.sampled_from(DetectorKind),
    source=identifiers,
    camera_id=identifiers,
    site_id=st.none() | identifiers,
    zone_id=st.none() | identifiers,
    event_time_ms=st.integers(min_value=0, max_value=2**53),
    label=identifiers,
    confidence=st.none() | unit,
    tracker_id=st.none() | identifiers,
    bbox=st.none() | boxes(unit).map(lambda box: NormalisedBBox(**box)),
    bbox_px=st.none() | boxes(finite).map(lambda box: BBox(**box)),
    position=st.none() | st.builds(GroundPoint, x_m=finite, y_m=finite, z_m=finite),
    attributes=st.dictionaries(st.text(max_size=10), attribute_values, max_size=5),
)


@given(event=events)
def test_property_json_round_trip(event: DetectorEvent) -> None:
    again = DetectorEvent.model_validate_json(event.model_dump_json())

    assert again == event


@given(event=events, absorbed=st.lists(identifiers, max_size=3))
def test_property_cached_json_is_the_models_json(
    event: DetectorEvent, absorbed: list[str]
) -> None:
    aggregated = AggregatedEvent(
        aggregated_id=f"dedup-5s:{event.event_id}",
        type="observation",
        status="closed",
        rule_id="dedup-5s",
        camera_id=event.camera_id,
        detector=event.detector,
        label=event.label,
        start_time_ms=event.event_time_ms,
        end_time_ms=event.event_time_ms,
        absorbed_count=len(absorbed),
        absorbed_ids=absorbed,
        event=event,
    )

    assert json.loads(event.json_text) == json.loads(event.model_dump_json())
    assert json.loads(aggregated.json_text) == json.loads(aggregated.model_dump_json())


def test_a_changed_copy_makes_its_own_json() -> None:
    event = DetectorEvent(
        event_id="e-1",
        detector=DetectorKind.PERSON,
        source="unified",
        camera_id="cam-1",
        event_time_ms=1,
        label="person",
    )
    assert '"cam-1"' in event.json_text

    moved = event.model_copy(update={"camera_id": "cam-2"})

    assert '"cam-2"' in moved.json_text
    assert '"cam-1"' in event.json_text


@pytest.mark.parametrize("event_id", ["a\x00b", "line\nbreak", "\x7f"])
def test_an_identifier_with_a_control_character_is_refused(event_id: str) -> None:
    with pytest.raises(ValidationError):
        DetectorEvent(
            event_id=event_id,
            detector=DetectorKind.PERSON,
            source="unified",
            camera_id="cam-1",
            event_time_ms=1,
            label="person",
        )


def test_a_boolean_is_no_confidence() -> None:
    with pytest.raises(ValidationError):
        DetectorEvent.model_validate_json(
            '{"event_id": "e", "detector": "person", "source": "unified",'
            ' "camera_id": "c", "event_time_ms": 1, "label": "p", "confidence": true}'
        )
