"""The unified event schema: one model for every detector, one for every output.

A producer's own format is turned into :class:`DetectorEvent` by an adapter
(``aggregator_app.adapters``). Everything after ingest sees only this model.
Times are UTC epoch milliseconds (``*_ms``); positions on the ground plane are
metres (``*_m``); boxes are normalised to the frame (0..1) when the frame size is
known, and kept in pixels (``bbox_px``) as the producer gave them.

``SCHEMA_VERSION`` changes when a field changes meaning or is removed; adding an
optional field does not change it. ``docs/event-schema.json`` is generated from
these models (``python -m aggregator_app.schema``) and a test keeps it in step.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import sys
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SCHEMA_VERSION",
    "ActionEvent",
    "AggregatedEvent",
    "BBox",
    "CorrelatedEvent",
    "DetectorEvent",
    "DetectorKind",
    "EpisodeEvent",
    "GroundPoint",
    "PathPoint",
    "json_schema",
]

SCHEMA_VERSION: Final = 1

#: An id or a name: printable, no control characters (a NUL cuts strings short
#: in C code downstream, a newline forges log lines).
Identifier = Annotated[
    str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
]
#: A number in [0, 1]; a JSON ``true`` is no confidence (strict: no bool).
Confidence = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
AttributeValue = str | int | float | bool | None


class DetectorKind(enum.StrEnum):
    """What kind of detector produced an event."""

    PERSON = "person"
    OBJECT = "object"
    VEHICLE = "vehicle"
    FACE = "face"
    GESTURE = "gesture"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Self:
        """Return a copy; a changed copy makes its own JSON again."""
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("json_text", None)
        return copy


class BBox(_Frozen):
    """An axis-aligned box, ``x_min <= x_max`` and ``y_min <= y_max``."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @model_validator(mode="after")
    def _ordered(self) -> BBox:
        if self.x_min > self.x_max or self.y_min > self.y_max:
            raise ValueError("box corners are out of order (min > max)")
        return self

    def center(self) -> tuple[float, float]:
        """Return the box centre as ``(x, y)``."""
        return ((self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2)


class NormalisedBBox(BBox):
    """A box in frame coordinates, every corner within ``[0, 1]``."""

    @model_validator(mode="after")
    def _inside_frame(self) -> NormalisedBBox:
        corners = (self.x_min, self.y_min, self.x_max, self.y_max)
        if any(not 0.0 <= value <= 1.0 for value in corners):
            raise ValueError("normalised box corner outside [0, 1]")
        return self


class GroundPoint(_Frozen):
    """A position on the site's ground plane, in metres."""

    x_m: float
    y_m: float
    z_m: float = 0.0


class DetectorEvent(_Frozen):
    """One detection by one detector on one camera, in the unified form."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Identifier
    detector: DetectorKind
    source: Identifier = Field(description="adapter that produced it, e.g. deepstream")
    camera_id: Identifier
    site_id: Identifier | None = None
    zone_id: Identifier | None = None
    event_time_ms: int = Field(ge=0, description="when it was seen, UTC epoch ms")
    label: Identifier
    confidence: Confidence | None = None
    tracker_id: Identifier | None = None
    bbox: NormalisedBBox | None = None
    bbox_px: BBox | None = None
    position: GroundPoint | None = None
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)

    @functools.cached_property
    def json_text(self) -> str:
        """Return the event as JSON, made once: the model is frozen.

        An event is written several times (its observation, its store row,
        its span); this is the one serialisation they share.
        """
        return self.model_dump_json()

    @field_validator("attributes")
    @classmethod
    def _finite_attributes(
        cls, attributes: dict[str, AttributeValue]
    ) -> dict[str, AttributeValue]:
        for name, value in attributes.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"attribute {name!r} is not a finite number")
        return attributes


class AggregatedEvent(_Frozen):
    """A high-level event published on ``aggregated-events``.

    ``type`` says what it is. An ``observation`` is a detector event kept by
    deduplication. It is published twice at most, with one ``aggregated_id``:
    ``status="open"`` as soon as it is kept (low latency) and ``status="closed"``
    once its dedup span ended, carrying every event it absorbed.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    aggregated_id: Identifier
    type: Literal["observation"]
    status: Literal["open", "closed"]
    rule_id: Identifier
    camera_id: Identifier
    site_id: Identifier | None = None
    detector: DetectorKind
    label: Identifier
    start_time_ms: int
    end_time_ms: int
    absorbed_count: int = Field(ge=0)
    absorbed_ids: list[str] = Field(default_factory=list)
    event: DetectorEvent

    @functools.cached_property
    def json_text(self) -> str:
        """Return the event as JSON, made once, with its inner event's JSON."""
        head = self.model_dump_json(exclude={"event"})
        return f'{head[:-1]},"event":{self.event.json_text}}}'


class ActionEvent(_Frozen):
    """Several detector events of one camera that an action rule joined.

    Published once, final, when the rule has decided (see
    ``docs/event-patterns.md``). ``aggregated_id`` is
    ``<rule_id>:<member event ids joined by "+">``: the same members always
    give the same id, so a copy published again after a restart is
    recognisable. ``members`` are in the rule's order (anchor then partner;
    first then then); ``overlap`` is the box overlap a pair rule measured.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    aggregated_id: Identifier
    type: Literal["action"] = "action"
    status: Literal["closed"] = "closed"
    rule_id: Identifier
    kind: Literal["pair", "sequence"]
    action: Identifier
    camera_id: Identifier
    site_id: Identifier | None = None
    start_time_ms: int
    end_time_ms: int
    overlap: float | None = None
    members: list[DetectorEvent] = Field(min_length=2)

    @functools.cached_property
    def json_text(self) -> str:
        """Return the event as JSON, made once."""
        return self.model_dump_json()


class PathPoint(_Frozen):
    """One point of an episode's path: where an object was, when, seen by whom."""

    time_ms: int
    camera_id: Identifier
    x_m: float
    y_m: float


class EpisodeEvent(_Frozen):
    """One global object's stay, fused from its observations across cameras.

    Published once, final, when the object has been quiet for the rule's
    gap (see ``docs/event-patterns.md``). ``cameras`` are in the order
    visited (a camera seen again after another appears again); ``path`` is
    thinned; ``aggregated_id`` is ``episode:<global id>:<start ms>``.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    aggregated_id: Identifier
    type: Literal["episode"] = "episode"
    status: Literal["closed"] = "closed"
    global_id: Identifier
    site_id: Identifier | None = None
    start_time_ms: int
    end_time_ms: int
    duration_ms: int = Field(ge=0)
    cameras: list[str] = Field(min_length=1)
    path: list[PathPoint] = Field(default_factory=list)
    best_confidence: Confidence | None = None
    observation_count: int = Field(ge=1)

    @functools.cached_property
    def json_text(self) -> str:
        """Return the event as JSON, made once."""
        return self.model_dump_json()


class CorrelatedEvent(_Frozen):
    """One physical object of a site, as several cameras (or repeats) saw it.

    Published on ``aggregated-events`` by correlation: ``status="open"`` when
    its global id is made, ``status="closed"`` once the object has not been
    seen for ``close_after_s`` of event time, or when it turned out to be the
    same object as an older global id (``merged_into``). ``aggregated_id`` is
    made from the global id and the status: published again after a restart,
    the record is recognisably the same.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    aggregated_id: Identifier
    type: Literal["correlated"]
    status: Literal["open", "closed"]
    rule_id: Identifier
    global_id: Identifier
    site_id: str
    cameras: list[str]
    first_seen_ms: int
    last_seen_ms: int
    member_count: int = Field(ge=0)
    member_ids: list[str] = Field(
        default_factory=list, description="the first max_member_ids members"
    )
    last_position: GroundPoint | None = None
    merged_into: str | None = None

    @functools.cached_property
    def json_text(self) -> str:
        """Return the event as JSON, made once: the model is frozen."""
        return self.model_dump_json()


def json_schema() -> dict[str, object]:
    """Return the JSON Schema of every published model, as written to docs/."""
    return {
        "$comment": "generated by `python -m aggregator_app.schema`; do not edit",
        "schema_version": SCHEMA_VERSION,
        "DetectorEvent": DetectorEvent.model_json_schema(),
        "AggregatedEvent": AggregatedEvent.model_json_schema(),
        "ActionEvent": ActionEvent.model_json_schema(),
        "EpisodeEvent": EpisodeEvent.model_json_schema(),
        "CorrelatedEvent": CorrelatedEvent.model_json_schema(),
    }


if __name__ == "__main__":
    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
