"""The per-record ingest step: one Kafka record in, validated events out.

The Kafka agents call :func:`parse_record` for every record of a detector
topic. It is pure (no I/O, the clock is an argument) so that it can be tested
and measured alone. A record that cannot become events raises
:class:`~aggregator_app.exceptions.RejectedEvent` with one of these reasons;
the agent then writes the original value, byte for byte, to the dead-letter
topic with the headers of :func:`dead_letter_headers`.

===========================  ====================================================
reason                       the record ...
===========================  ====================================================
``too_large``                is longer than ``ingest.max_payload_bytes``
``empty``                    has no value, or an empty one
``broken_json``              is not JSON
``broken_csv``               is not a MOT row of 7 to 10 numbers
``non_finite_number``        holds NaN or infinity (also as a JSON literal)
``wrong_type``               has a field of the wrong type, or is not an object
``missing_field``            lacks a required field
``unknown_field``            has a field the unified schema does not know
``unknown_detector``         names a detector kind that is not a DetectorKind
``confidence_out_of_range``  has a confidence outside [0, 1]
``bad_bbox``                 has a box with corners out of order or outside [0, 1]
``bad_timestamp``            has a time that cannot be read, or before 1970
``missing_time``             has a relative time and no record timestamp
``wrong_schema_version``     declares a schema version this service does not read
``invalid_field``            has another invalid value (e.g. an empty id)
``unknown_camera``           comes from a camera the rules do not know (or none)
``clock_skew``               is further than ``max_clock_skew_s`` from the clock
``adapter_error``            made an adapter fail unexpectedly (a bug: logged)
===========================  ====================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from aggregator_app.adapters import Adapter, AdapterContext, JsonObject, adapter_for
from aggregator_app.exceptions import RejectedEvent
from aggregator_app.schema import BBox, DetectorEvent, NormalisedBBox
from rules.config import CameraInfo, RulesConfig, SourceConfig

__all__ = [
    "REPLAY_HEADER",
    "HEADER_DETAIL",
    "HEADER_OFFSET",
    "HEADER_PARTITION",
    "HEADER_REASON",
    "HEADER_TOPIC",
    "RawRecord",
    "dead_letter_headers",
    "parse_record",
]

logger = logging.getLogger(__name__)

#: Header set by the replay tool: the record is recorded data, and its
#: timestamp (not the worker's clock) is the reference for the clock-skew check.
REPLAY_HEADER: Final = "x-aggregator-replay"

HEADER_REASON: Final = "dead-letter-reason"
HEADER_DETAIL: Final = "dead-letter-detail"
HEADER_TOPIC: Final = "dead-letter-source-topic"
HEADER_PARTITION: Final = "dead-letter-source-partition"
HEADER_OFFSET: Final = "dead-letter-source-offset"

_MAX_DETAIL_BYTES: Final = 1024
_MAX_CACHED_CAMERAS: Final = 10_000
_MAX_CACHED_RULES: Final = 8
_TYPE_ERRORS: Final = frozenset(
    {"int_from_float", "model_attributes_type", "model_type", "union_tag_invalid"}
)


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One Kafka record of a detector topic, as consumed.

    Attributes:
        value: the record value, untouched.
        key: the record key, untouched.
        topic: the topic it was consumed from.
        partition: its partition.
        offset: its offset in that partition.
        timestamp_ms: the record timestamp (UTC epoch ms), if any.
        replayed: the replay tool marked it as recorded data, so its own
            timestamp, not the worker's clock, is the reference for clock skew.
    """

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    replayed: bool = False


def parse_record(
    record: RawRecord, *, source: SourceConfig, rules: RulesConfig, now_ms: int
) -> list[DetectorEvent]:
    """Turn one detector record into validated, enriched events.

    Steps:
        1. Reject a value longer than the limit, before reading it.
        2. Reject a missing or empty value.
        3. Let the source's adapter read it into event fields.
        4. For each event: validate it, check its camera and its clock skew,
           and enrich it from the rules (site, zone, normalised box).

    Args:
        record: the consumed record.
        source: the configured source of the record's topic.
        rules: the rules in force.
        now_ms: the worker's clock (UTC epoch ms).

    Returns:
        The events of the record, possibly none.

    Raises:
        RejectedEvent: the record cannot become events; ``reason`` is one of
            the codes in the module docstring. One bad event rejects its whole
            record, as the dead-letter copy is of the whole record.
    """
    view = _view_of(rules)
    value = record.value

    # Step 1.
    if value is not None and len(value) > view.max_payload_bytes:
        raise RejectedEvent(
            "too_large", f"{len(value)} bytes > limit {view.max_payload_bytes}"
        )

    # Step 2.
    if not value:
        raise RejectedEvent("empty", "the record has no value")

    # Step 3.
    context = AdapterContext(
        source=source,
        key=record.key,
        record_timestamp_ms=record.timestamp_ms,
        naive_timestamps=view.naive_timestamps,
    )
    all_fields = _adapt(adapter_for(source.adapter), value, context)

    # Step 4.
    reference_ms = now_ms
    if record.replayed and record.timestamp_ms is not None:
        reference_ms = record.timestamp_ms
    return [
        _accept(fields, view=view, source=source, reference_ms=reference_ms)
        for fields in all_fields
    ]


def dead_letter_headers(
    record: RawRecord, error: RejectedEvent
) -> list[tuple[str, bytes]]:
    """Return the headers of a rejected record's dead-letter copy.

    The copy keeps the original key and value byte for byte; these headers say
    why it was rejected and where it came from. The detail is cut to at most
    1 KiB, on a character boundary.
    """
    cut = error.detail.encode("utf-8", "replace")[:_MAX_DETAIL_BYTES]
    detail = cut.decode("utf-8", "ignore").encode("utf-8")  # no half character
    return [
        (HEADER_REASON, error.reason.encode("utf-8")),
        (HEADER_DETAIL, detail),
        (HEADER_TOPIC, record.topic.encode("utf-8")),
        (HEADER_PARTITION, str(record.partition).encode("ascii")),
        (HEADER_OFFSET, str(record.offset).encode("ascii")),
    ]


class _RulesView:
    """What ingest reads from one rules object, derived once, and a camera cache."""

    __slots__ = (
        "_known",
        "allow_unknown_cameras",
        "max_payload_bytes",
        "max_skew_ms",
        "naive_timestamps",
        "rules",
    )

    def __init__(self, rules: RulesConfig) -> None:
        self.rules = rules
        self.max_payload_bytes = rules.ingest.max_payload_bytes
        self.max_skew_ms = round(rules.ingest.max_clock_skew_s * 1000)
        self.naive_timestamps = rules.ingest.naive_timestamps
        self.allow_unknown_cameras = rules.ingest.allow_unknown_cameras
        self._known: dict[str, CameraInfo | None] = {}

    def camera(self, camera_id: str) -> CameraInfo | None:
        """Return ``rules.camera(camera_id)``, remembered."""
        try:
            return self._known[camera_id]
        except KeyError:
            pass
        if len(self._known) >= _MAX_CACHED_CAMERAS:
            self._known.clear()  # a flood of made-up camera ids must not grow it
        camera = self._known[camera_id] = self.rules.camera(camera_id)
        return camera


# Keyed by id(); each view holds its rules, so the id cannot be reused meanwhile.
_VIEWS: dict[int, _RulesView] = {}


def _view_of(rules: RulesConfig) -> _RulesView:
    view = _VIEWS.get(id(rules))
    if view is None:
        if len(_VIEWS) >= _MAX_CACHED_RULES:
            _VIEWS.clear()
        view = _VIEWS[id(rules)] = _RulesView(rules)
    return view


def _adapt(adapter: Adapter, value: bytes, context: AdapterContext) -> list[JsonObject]:
    try:
        return adapter.to_events(value, context)
    except RejectedEvent:
        raise
    except Exception as exc:  # an adapter bug must cost one record, not the agent
        logger.warning(
            "adapter failed on a record: adapter=%s error=%r",
            adapter.name,
            exc,
            exc_info=True,
        )
        raise RejectedEvent("adapter_error", f"{adapter.name}: {exc!r}") from exc


def _accept(
    fields: JsonObject, *, view: _RulesView, source: SourceConfig, reference_ms: int
) -> DetectorEvent:
    event = _validate(fields)

    camera = view.camera(event.camera_id)
    if camera is None and not view.allow_unknown_cameras:
        raise RejectedEvent("unknown_camera", f"camera {event.camera_id!r:.100}")

    skew_ms = event.event_time_ms - reference_ms
    if abs(skew_ms) > view.max_skew_ms:
        raise RejectedEvent(
            "clock_skew",
            f"event time {event.event_time_ms} is {skew_ms} ms from reference "
            f"{reference_ms}; limit {view.max_skew_ms} ms",
        )

    return _enrich(event, camera=camera, source=source)


def _validate(fields: JsonObject) -> DetectorEvent:
    try:
        return DetectorEvent.model_validate(fields)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        # A NaN in a union (attribute values) fails every branch; say NaN.
        chosen = next((e for e in errors if e["type"] == "finite_number"), errors[0])
        where = ".".join(str(part) for part in chosen["loc"]) or "event"
        raise RejectedEvent(
            _reason(chosen), f"{where}: {chosen['msg']} ({len(errors)} error(s))"
        ) from None


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    field = error["loc"][0] if error["loc"] else ""
    if kind == "finite_number" or (field == "attributes" and kind == "value_error"):
        return "non_finite_number"  # the only check on attribute values
    if kind == "missing":
        return "missing_field"
    if kind == "extra_forbidden":
        return "unknown_field"
    if field == "detector" and kind == "enum":
        return "unknown_detector"
    if field == "schema_version":
        return "wrong_schema_version"
    if kind.endswith(("_type", "_parsing")) or kind in _TYPE_ERRORS:
        return "wrong_type"
    return _value_reason(field)


def _value_reason(field: object) -> str:
    if field == "confidence":
        return "confidence_out_of_range"
    if field in ("bbox", "bbox_px"):
        return "bad_bbox"
    if field == "event_time_ms":
        return "bad_timestamp"
    return "invalid_field"


def _enrich(
    event: DetectorEvent, *, camera: CameraInfo | None, source: SourceConfig
) -> DetectorEvent:
    updates: dict[str, object] = {}

    if event.site_id is None:
        site_id = camera.site_id if camera is not None else source.site_id
        if site_id is not None:
            updates["site_id"] = site_id
    if event.zone_id is None and camera is not None and camera.zone_id is not None:
        updates["zone_id"] = camera.zone_id

    if event.bbox is None and event.bbox_px is not None and camera is not None:
        bbox = _normalise(event.bbox_px, camera)
        if bbox is not None:
            updates["bbox"] = bbox

    return event.model_copy(update=updates) if updates else event


def _normalise(box: BBox, camera: CameraInfo) -> NormalisedBBox | None:
    """Return a pixel box relative to the camera's frame, clamped to the frame."""
    width_px, height_px = camera.frame_width_px, camera.frame_height_px
    if width_px is None or height_px is None:
        return None
    return NormalisedBBox(
        x_min=_clamp(box.x_min / width_px),
        y_min=_clamp(box.y_min / height_px),
        x_max=_clamp(box.x_max / width_px),
        y_max=_clamp(box.y_max / height_px),
    )


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)
