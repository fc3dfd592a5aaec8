"""Rows of the event store: conversion from the models, the DDL, store URLs.

Pure: nothing here talks to ClickHouse (``tests/integration/test_store.py`` does).
"""

from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator_app.exceptions import ConfigError
from aggregator_app.schema import AggregatedEvent, DetectorEvent, GroundPoint
from aggregator_app.store import (
    AggregatedEventRow,
    DetectorEventRow,
    NativeStore,
    Outcome,
    aggregated_event_row,
    detector_event_row,
    open_store,
)
from aggregator_app.store.schema import (
    AGGREGATED_EVENTS,
    DETECTOR_EVENTS,
    create_table_sql,
    quote_identifier,
    sql_string,
    supports_ttl,
)

INSERTED_AT_MS = 1_700_000_000_123


def make_event(**overrides: object) -> DetectorEvent:
    fields: dict[str, object] = {
        "event_id": "ev-1",
        "detector": "vehicle",
        "source": "deepstream",
        "camera_id": "cam-1",
        "event_time_ms": 1_536_772_838_026,
        "label": "car",
    }
    fields.update(overrides)
    return DetectorEvent.model_validate(fields)


def make_aggregated(**overrides: object) -> AggregatedEvent:
    fields: dict[str, object] = {
        "aggregated_id": "agg-1",
        "type": "observation",
        "status": "open",
        "rule_id": "dedup-vehicles",
        "camera_id": "cam-1",
        "detector": "vehicle",
        "label": "car",
        "start_time_ms": 1_536_772_838_026,
        "end_time_ms": 1_536_772_840_000,
        "absorbed_count": 2,
        "absorbed_ids": ["ev-2", "ev-3"],
        "event": make_event(zone_id="zone-a", tracker_id="t-7"),
    }
    fields.update(overrides)
    return AggregatedEvent.model_validate(fields)


# Rows and tables agree.


@pytest.mark.parametrize(
    ("row_type", "spec"),
    [(DetectorEventRow, DETECTOR_EVENTS), (AggregatedEventRow, AGGREGATED_EVENTS)],
)
def test_row_fields_are_the_table_columns_in_order(
    row_type: type, spec: object
) -> None:
    names = tuple(field.name for field in dataclasses.fields(row_type))

    assert names == spec.column_names  # type: ignore[attr-defined]


# Detector events.


def test_detector_row_carries_the_event_fields() -> None:
    event = make_event(
        site_id="garage",
        zone_id="P1",
        confidence=0.75,
        tracker_id="42",
        position=GroundPoint(x_m=-54.3, y_m=-50.6),
    )

    row = detector_event_row(event, inserted_at_ms=INSERTED_AT_MS)

    assert row.event_id == "ev-1"
    assert row.outcome == "kept"
    assert row.kept_event_id == "ev-1"
    assert (row.site_id, row.zone_id, row.tracker_id) == ("garage", "P1", "42")
    assert row.confidence == 0.75
    assert row.event_time_ms == 1_536_772_838_026
    assert (row.position_x_m, row.position_y_m) == (-54.3, -50.6)
    assert row.version == INSERTED_AT_MS


def test_detector_row_keeps_absent_values_empty() -> None:
    row = detector_event_row(make_event(), inserted_at_ms=INSERTED_AT_MS)

    assert (row.site_id, row.zone_id, row.tracker_id) == ("", "", "")
    assert row.confidence is None
    assert (row.position_x_m, row.position_y_m) == (None, None)


def test_detector_row_payload_gives_the_event_back() -> None:
    event = make_event(attributes={"color": "red", "speed_kmh": 12.5})

    row = detector_event_row(event, inserted_at_ms=INSERTED_AT_MS)

    assert row.to_event() == event


@pytest.mark.parametrize("outcome", [Outcome.REPEAT, Outcome.REDELIVERY, "repeat"])
def test_detector_row_of_a_dropped_event_points_at_the_kept_one(
    outcome: Outcome | str,
) -> None:
    row = detector_event_row(
        make_event(event_id="ev-2"),
        outcome=Outcome(outcome),
        kept_event_id="ev-1",
        inserted_at_ms=INSERTED_AT_MS,
    )

    assert row.outcome == Outcome(outcome).value
    assert type(row.outcome) is str
    assert row.kept_event_id == "ev-1"


def test_detector_row_of_a_dropped_event_needs_the_kept_id() -> None:
    with pytest.raises(ValueError, match="kept event id"):
        detector_event_row(
            make_event(), outcome=Outcome.REPEAT, inserted_at_ms=INSERTED_AT_MS
        )


def test_kept_event_cannot_point_elsewhere() -> None:
    with pytest.raises(ValueError, match="its own kept event"):
        detector_event_row(
            make_event(), kept_event_id="other", inserted_at_ms=INSERTED_AT_MS
        )


def test_detector_row_round_trips_through_a_record() -> None:
    row = detector_event_row(make_event(confidence=0.5), inserted_at_ms=INSERTED_AT_MS)

    assert DetectorEventRow.from_record(row.record()) == row
    assert row.key() == ("ev-1",)


# Aggregated events.


def test_aggregated_row_is_keyed_by_id_and_status() -> None:
    opened = aggregated_event_row(make_aggregated(), inserted_at_ms=INSERTED_AT_MS)
    closed = aggregated_event_row(
        make_aggregated(status="closed"), inserted_at_ms=INSERTED_AT_MS
    )

    assert opened.key() == ("agg-1", "open")
    assert closed.key() == ("agg-1", "closed")


def test_aggregated_row_carries_the_event_fields() -> None:
    row = aggregated_event_row(make_aggregated(), inserted_at_ms=INSERTED_AT_MS)

    assert row.event_time_ms == 1_536_772_838_026  # the start, as partition time
    assert row.end_time_ms == 1_536_772_840_000
    assert row.absorbed_count == 2
    assert row.event_id == "ev-1"
    assert (row.zone_id, row.tracker_id) == ("zone-a", "t-7")
    assert row.to_event() == make_aggregated()
    assert AggregatedEventRow.from_record(row.record()) == row


_ids = st.text(
    alphabet=string.ascii_letters + string.digits + string.punctuation + " é✓",
    min_size=1,
    max_size=40,
)


@given(
    event_id=_ids,
    camera_id=_ids,
    event_time_ms=st.integers(min_value=0, max_value=4_000_000_000_000),
    confidence=st.none() | st.floats(min_value=0.0, max_value=1.0),
)
def test_any_event_survives_the_payload(
    event_id: str, camera_id: str, event_time_ms: int, confidence: float | None
) -> None:
    event = make_event(
        event_id=event_id,
        camera_id=camera_id,
        event_time_ms=event_time_ms,
        confidence=confidence,
    )

    row = detector_event_row(event, inserted_at_ms=INSERTED_AT_MS)

    assert row.to_event() == event
    assert DetectorEventRow.from_record(row.record()) == row


# SQL text.


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("18.16.1", False),
        ("19.5.4.22", False),
        ("19.6.1", True),
        ("26.9.2.1", True),
        ("unknown", False),
    ],
)
def test_ttl_is_used_from_19_6_on(version: str, expected: bool) -> None:
    assert supports_ttl(version) is expected


@pytest.mark.parametrize("spec", [DETECTOR_EVENTS, AGGREGATED_EVENTS])
def test_ddl_uses_only_what_18_16_has(spec: object) -> None:
    sql = create_table_sql("db", spec, ttl_days=None)  # type: ignore[arg-type]

    for missing in ("DateTime64", "LowCardinality", "Map(", "CODEC", "TTL", "INDEX"):
        assert missing not in sql
    assert "ReplacingMergeTree(version)" in sql
    assert "PARTITION BY toYYYYMMDD(event_time)" in sql


def test_ddl_has_ttl_when_asked() -> None:
    sql = create_table_sql("db", DETECTOR_EVENTS, ttl_days=30)

    assert "TTL inserted_at + INTERVAL 30 DAY" in sql


def test_sort_key_ends_with_the_row_key() -> None:
    sql = create_table_sql("db", AGGREGATED_EVENTS, ttl_days=None)

    assert (
        "ORDER BY (toStartOfHour(event_time), camera_id, event_time_ms, "
        "aggregated_id, status)"
    ) in sql


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", "'plain'"),
        ("it's", "'it\\'s'"),
        ("back\\slash", "'back\\\\slash'"),
        ("\\'", "'\\\\\\''"),
    ],
)
def test_string_literals_are_escaped(value: str, literal: str) -> None:
    assert sql_string(value) == literal


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "a`b", "x" * 65])
def test_identifiers_must_be_plain(name: str) -> None:
    with pytest.raises(ValueError):
        quote_identifier(name)


# Store URLs (the native store does not connect before its first call).


def test_native_url_names_host_port_database_and_user() -> None:
    store = open_store("clickhouse://reader:s%40cret@db.local:9440/events")

    assert isinstance(store, NativeStore)
    assert store.address == "db.local:9440"
    assert store.database == "events"


def test_native_url_defaults() -> None:
    store = open_store("clickhouse://localhost")

    assert isinstance(store, NativeStore)
    assert store.address == "localhost:9000"
    assert store.database == "aggregator"


@pytest.mark.parametrize(
    "url",
    [
        "postgres://localhost/db",
        "clickhouse://localhost/bad-name",
        "clickhouse://localhost:port/db",
        "clickhouse:///db",
        "chdb://",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)
