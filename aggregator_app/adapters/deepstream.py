"""NVIDIA DeepStream messages, nvmsgconv "full" schema (mdsversion 1.0).

One message describes one object seen by one sensor::

    {"messageid", "@timestamp", "place": {"name", "aisle" | "parkingSpot"},
     "sensor": {"id"}, "object": {"id", "speed", "direction", "orientation",
     "vehicle" | "person" | "face": {...}, "bbox", "coordinate"},
     "event": {"type"}}

DeepStream fills fields that it has no value for with sentinels, which are read
as absent here:

* a negative confidence: ``-0.1`` is what DeepStream writes when no component
  set the object's confidence (the deepstream-test4 sample shows it);
* an object id of ``"-1"``: the object is not tracked;
* a ``coordinate`` or ``bbox`` of all zeros: no position, no box;
* ``""`` and ``"UNKNOWN"`` in the vehicle's text fields (the 360-degree garage
  data writes ``type: "UNKNOWN"`` on every moving vehicle).

A confidence of 0 or more is passed on as it is, though the garage data shows
it is not always a detector score: 0.0 on every moving vehicle, 1 on every
parked or empty spot.

``object.location`` (latitude/longitude) is ignored: it is a constant
placeholder in every sample seen. ``object.coordinate`` is the position on the
site's ground plane, in metres, shared by all cameras of the site. The
attribute ``speed`` is passed on as sent: the schema names no unit for it.
"""

from __future__ import annotations

from typing import Final

from aggregator_app.adapters.base import (
    Adapter,
    AdapterContext,
    JsonObject,
    decode_object,
    get_number,
    get_object,
    optional_str,
    require_str,
)
from aggregator_app.exceptions import RejectedEvent
from aggregator_app.timeparse import to_epoch_ms

__all__ = ["DeepStreamAdapter"]

_KINDS: Final = ("vehicle", "person", "face")
_UNSET_TEXT: Final = frozenset({"", "UNKNOWN"})
_ZONE_KEYS: Final = (("aisle", "aisle"), ("parkingSpot", "parking_spot"))
_VEHICLE_ATTRIBUTES: Final = (
    ("license", "licence"),
    ("licenseState", "licence_state"),
    ("make", "make"),
    ("model", "model"),
    ("color", "colour"),
)


class DeepStreamAdapter(Adapter):
    """Reads DeepStream nvmsgconv full-schema messages."""

    name = "deepstream"

    def to_events(self, payload: bytes, context: AdapterContext) -> list[JsonObject]:
        """Return the one event of a DeepStream message."""
        message = decode_object(payload)
        detected = get_object(message, "object")
        kind, details = _kind(detected)
        place = get_object(message, "place", required=False)
        zone, zone_kind = _zone(place)

        event: JsonObject = {
            "event_id": require_str(message, "messageid"),
            "detector": kind,
            "source": self.name,
            "camera_id": require_str(get_object(message, "sensor"), "id"),
            "site_id": optional_str(place, "name"),
            "zone_id": optional_str(zone, "id"),
            "event_time_ms": _event_time_ms(message, context),
            "label": _label(kind, details),
            "confidence": _confidence(detected, details),
            "tracker_id": _tracker_id(detected),
            "bbox_px": _bbox_px(detected),
            "position": _position(detected),
            "attributes": _attributes(message, detected, details, zone, zone_kind),
        }
        return [event]


def _event_time_ms(message: JsonObject, context: AdapterContext) -> int:
    stamp = message.get("@timestamp")
    if stamp is None:
        raise RejectedEvent("missing_field", "'@timestamp' is missing")
    return to_epoch_ms(stamp, naive=context.naive_timestamps)


def _kind(detected: JsonObject) -> tuple[str, JsonObject]:
    for kind in _KINDS:
        details = detected.get(kind)
        if isinstance(details, dict):
            return kind, details
    return "object", {}


def _label(kind: str, details: JsonObject) -> str:
    if kind != "vehicle":
        return kind
    vehicle_type = details.get("type")
    if isinstance(vehicle_type, str) and vehicle_type not in _UNSET_TEXT:
        return vehicle_type
    return kind


def _confidence(detected: JsonObject, details: JsonObject) -> float | None:
    # DeepStream 6 puts the detector's confidence on the object; DeepStream 5
    # (and the garage data) only on the vehicle/person/face sub-object.
    confidence = get_number(detected, "confidence")
    if confidence is None:
        confidence = get_number(details, "confidence")
    if confidence is None or confidence < 0:
        return None
    return confidence


def _tracker_id(detected: JsonObject) -> object:
    tracker_id = detected.get("id")
    if tracker_id is None or tracker_id in ("", "-1", -1):
        return None
    if isinstance(tracker_id, int) and not isinstance(tracker_id, bool):
        return str(tracker_id)
    return tracker_id  # not a string: validation rejects it as wrong_type


def _bbox_px(detected: JsonObject) -> JsonObject | None:
    box = get_object(detected, "bbox", required=False)
    x_min, y_min = box.get("topleftx"), box.get("toplefty")
    x_max, y_max = box.get("bottomrightx"), box.get("bottomrighty")
    if not (x_min or y_min or x_max or y_max):  # absent, or DeepStream's zeros
        return None
    return {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}


def _position(detected: JsonObject) -> JsonObject | None:
    coordinate = get_object(detected, "coordinate", required=False)
    x_m, y_m, z_m = coordinate.get("x"), coordinate.get("y"), coordinate.get("z")
    if not (x_m or y_m or z_m):  # absent, or DeepStream's zeros
        return None
    return {"x_m": x_m, "y_m": y_m, "z_m": 0.0 if z_m is None else z_m}


def _zone(place: JsonObject) -> tuple[JsonObject, str | None]:
    for key, zone_kind in _ZONE_KEYS:
        zone = get_object(place, key, required=False)
        if zone:
            return zone, zone_kind
    return {}, None


def _attributes(
    message: JsonObject,
    detected: JsonObject,
    details: JsonObject,
    zone: JsonObject,
    zone_kind: str | None,
) -> JsonObject:
    attributes: JsonObject = {}
    _put(attributes, "event_type", get_object(message, "event", required=False), "type")
    _put(attributes, "speed", detected, "speed")
    _put(attributes, "direction_deg", detected, "direction")
    _put(attributes, "orientation_deg", detected, "orientation")
    _put(attributes, "level", zone, "level")
    if zone_kind is not None:
        attributes["zone_kind"] = zone_kind

    for field, name in _VEHICLE_ATTRIBUTES:
        value = details.get(field)
        if isinstance(value, str) and value not in _UNSET_TEXT:
            attributes[name] = value
    return attributes


def _put(attributes: JsonObject, name: str, holder: JsonObject, key: str) -> None:
    value = holder.get(key)
    if value is not None:
        attributes[name] = value
