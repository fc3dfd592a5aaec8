"""Frigate NVR tracked objects, in either of the two forms Frigate publishes.

* A record of its HTTP API ``/api/events``: ``{id, camera, label, start_time,
  end_time, false_positive, zones, data: {top_score, box?}}``; times are epoch
  seconds; ``data.box`` (Frigate 0.13+) is ``[x, y, width, height]`` relative
  to the frame.
* A message of its MQTT topic ``frigate/events``: ``{type: new|update|end,
  before, after}``; ``after`` is the object's current state, with the time of
  the frame (``frame_time``), the current ``score`` and the pixel ``box``
  ``[x_min, y_min, x_max, y_max]``.

Frigate's id names one tracked object for its whole life, so it is both the
event id and the tracker id. An object Frigate still marks as a false positive
gives no event.
"""

from __future__ import annotations

from typing import Final

from aggregator_app.adapters.base import (
    Adapter,
    AdapterContext,
    JsonObject,
    decode_object,
    detector_for_label,
    get_number,
    get_object,
    require_str,
)
from aggregator_app.exceptions import RejectedEvent
from aggregator_app.timeparse import to_epoch_ms

__all__ = ["FrigateAdapter"]

_MQTT_TYPES: Final = frozenset({"new", "update", "end"})
_ZONE_KEYS: Final = ("current_zones", "zones", "entered_zones")
_KEPT_ATTRIBUTES: Final = (
    "false_positive",
    "has_clip",
    "has_snapshot",
    "stationary",
    "recognized_license_plate",
)


class FrigateAdapter(Adapter):
    """Reads Frigate ``/api/events`` records and ``frigate/events`` messages."""

    name = "frigate"

    def to_events(self, payload: bytes, context: AdapterContext) -> list[JsonObject]:
        """Return the event of a Frigate record, or none for a false positive."""
        message = decode_object(payload)
        tracked, message_type = _tracked_object(message)
        if tracked.get("false_positive") is True:
            return []

        frigate_id = require_str(tracked, "id")
        label = require_str(tracked, "label")
        event: JsonObject = {
            "event_id": frigate_id,
            "detector": detector_for_label(label),
            "source": self.name,
            "camera_id": require_str(tracked, "camera"),
            "zone_id": _first_zone(tracked),
            "event_time_ms": _event_time_ms(tracked, context),
            "label": label,
            "confidence": _confidence(tracked),
            "tracker_id": frigate_id,
            "bbox": _relative_bbox(tracked),
            "bbox_px": _pixel_bbox(tracked),
            "attributes": _attributes(tracked, message_type, context),
        }
        return [event]


def _tracked_object(message: JsonObject) -> tuple[JsonObject, str | None]:
    # An API record has no "type"; every MQTT message has one.
    if "type" not in message and "after" not in message:
        return message, None
    message_type = message.get("type")
    if not isinstance(message_type, str) or message_type not in _MQTT_TYPES:
        raise RejectedEvent(
            "wrong_type", f"not a frigate/events message: type={message_type!r:.40}"
        )
    return get_object(message, "after"), message_type


def _event_time_ms(tracked: JsonObject, context: AdapterContext) -> int:
    stamp = tracked.get("frame_time")
    if stamp is None:
        stamp = tracked.get("start_time")
    if stamp is None:
        raise RejectedEvent("missing_field", "neither 'frame_time' nor 'start_time'")
    return to_epoch_ms(stamp, naive=context.naive_timestamps)


def _confidence(tracked: JsonObject) -> float | None:
    data = get_object(tracked, "data", required=False)
    for holder, key in (
        (tracked, "score"),
        (data, "top_score"),
        (tracked, "top_score"),
    ):
        confidence = get_number(holder, key)
        if confidence is not None:
            return confidence
    return None


def _first_zone(tracked: JsonObject) -> object:
    for key in _ZONE_KEYS:
        zones = tracked.get(key)
        if isinstance(zones, list) and zones:
            return zones[0]
    return None


def _pixel_bbox(tracked: JsonObject) -> JsonObject | None:
    box = _four_numbers(tracked, "box")
    if box is None:
        return None
    x_min, y_min, x_max, y_max = box
    return {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}


def _relative_bbox(tracked: JsonObject) -> JsonObject | None:
    box = _four_numbers(get_object(tracked, "data", required=False), "box")
    if box is None:
        return None
    x, y, width, height = box
    return {"x_min": x, "y_min": y, "x_max": x + width, "y_max": y + height}


def _four_numbers(holder: JsonObject, key: str) -> list[float] | None:
    box = holder.get(key)
    if box is None:
        return None
    if not isinstance(box, list) or len(box) != 4:
        raise RejectedEvent("wrong_type", f"{key!r} must be a list of four numbers")
    for value in box:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RejectedEvent("wrong_type", f"{key!r} must be a list of four numbers")
    return box


def _attributes(
    tracked: JsonObject, message_type: str | None, context: AdapterContext
) -> JsonObject:
    attributes: JsonObject = {
        name: tracked[name] for name in _KEPT_ATTRIBUTES if name in tracked
    }
    if message_type is not None:
        attributes["message_type"] = message_type

    end_time = tracked.get("end_time")
    if end_time is not None:
        attributes["end_time_ms"] = to_epoch_ms(
            end_time, naive=context.naive_timestamps
        )

    sub_label = tracked.get("sub_label")
    if isinstance(sub_label, list) and sub_label:
        sub_label = sub_label[0]  # Frigate 0.14+: [name, score]
    if isinstance(sub_label, str):
        attributes["sub_label"] = sub_label
    return attributes
