"""MOTChallenge detection rows, one CSV row per record.

A row is ``frame,id,left,top,width,height,confidence,x,y,z`` (frame numbers
from 1, pixel box from its top-left corner, ``-1`` for "not given"). The row
names no camera and no time: the camera is the Kafka key (the sequence name,
e.g. ``TUD-Stadtmitte``) and the time is the Kafka record timestamp, which the
producer computes from the frame number and the sequence's frame rate.
``x, y, z`` are the ground-plane position, when the sequence is calibrated.
The event id is derived from the camera and the row, so a redelivered row gives
the same id.
"""

from __future__ import annotations

import math
from typing import Final

from aggregator_app.adapters.base import (
    Adapter,
    AdapterContext,
    JsonObject,
    camera_from_key,
    stable_id,
)
from aggregator_app.exceptions import RejectedEvent

__all__ = ["MotAdapter", "parse_row"]

_MIN_COLUMNS: Final = 7
_MAX_COLUMNS: Final = 10
_NOT_GIVEN: Final = -1.0


class MotAdapter(Adapter):
    """Reads MOTChallenge ``det.txt`` / ``gt.txt`` rows."""

    name = "mot"

    def to_events(self, payload: bytes, context: AdapterContext) -> list[JsonObject]:
        """Return the one event of a MOT row."""
        values = parse_row(payload)
        camera_id = camera_from_key(context.key)
        if camera_id is None:
            raise RejectedEvent("unknown_camera", "a MOT row needs the camera as key")
        if context.record_timestamp_ms is None:
            raise RejectedEvent("missing_time", "a MOT row needs a record timestamp")

        frame, tracker, left, top, width, height, confidence = values[:7]
        detector = context.source.detector or "person"
        event: JsonObject = {
            "event_id": stable_id(camera_id, *values),
            "detector": detector,
            "source": self.name,
            "camera_id": camera_id,
            "event_time_ms": context.record_timestamp_ms,
            "label": detector,
            "confidence": None if confidence == _NOT_GIVEN else confidence,
            "tracker_id": None if tracker == _NOT_GIVEN else str(int(tracker)),
            "bbox_px": {
                "x_min": left,
                "y_min": top,
                "x_max": left + width,
                "y_max": top + height,
            },
            "position": _position(values[7:]),
            "attributes": {"frame": int(frame)},
        }
        return [event]


def parse_row(payload: bytes) -> list[float]:
    """Return the numbers of one MOT CSV row.

    Raises:
        RejectedEvent: ``broken_csv`` for a row that is not 7 to 10 numbers or
            whose frame is not a whole number from 1, ``non_finite_number`` for
            NaN or infinity.
    """
    try:
        values = [float(cell) for cell in payload.decode("ascii").split(",")]
    except (UnicodeDecodeError, ValueError):
        raise RejectedEvent(
            "broken_csv", f"not a row of numbers: {payload!r:.80}"
        ) from None

    if not _MIN_COLUMNS <= len(values) <= _MAX_COLUMNS:
        raise RejectedEvent("broken_csv", f"{len(values)} columns, expected 7 to 10")
    if not all(math.isfinite(value) for value in values):
        raise RejectedEvent(
            "non_finite_number", f"row holds NaN or inf: {payload!r:.80}"
        )
    if values[0] < 1 or not values[0].is_integer():
        raise RejectedEvent(
            "broken_csv", f"frame must be a whole number from 1: {values[0]}"
        )
    if values[1] != _NOT_GIVEN and not values[1].is_integer():
        raise RejectedEvent("broken_csv", f"id must be a whole number: {values[1]}")
    return values


def _position(world: list[float]) -> JsonObject | None:
    if len(world) < 2 or world[0] == _NOT_GIVEN or world[1] == _NOT_GIVEN:
        return None
    z_m = world[2] if len(world) > 2 and world[2] != _NOT_GIVEN else 0.0
    return {"x_m": world[0], "y_m": world[1], "z_m": z_m}
