"""Intel DL Streamer ``gvametapublish`` JSON lines.

One line describes one frame and every object detected in it::

    {"objects": [{"detection": {"bounding_box": {x_min, y_min, x_max, y_max},
                                "confidence", "label", "label_id"},
                  "x", "y", "w", "h", "id"?}],
     "resolution": {"width", "height"}, "source": "<uri>", "timestamp": <ns>}

``timestamp`` is nanoseconds since the start of the stream, not a wall-clock
time, so the event time is the Kafka record timestamp that the producer sets
when it publishes; the stream offset is kept as ``stream_offset_ns``. The
bounding box is already normalised to the frame; ``x, y, w, h`` are pixels.
The camera is the Kafka key, or else a name derived from the stream's source
URI. The event id is derived from the camera, the stream offset and the
object's place in the line, so a redelivered line gives the same ids.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Final
from urllib.parse import urlsplit

from aggregator_app.adapters.base import (
    Adapter,
    AdapterContext,
    JsonObject,
    camera_from_key,
    decode_object,
    detector_for_label,
    get_number,
    get_object,
    optional_str,
    stable_id,
)
from aggregator_app.exceptions import RejectedEvent

__all__ = ["DLStreamerAdapter", "camera_from_source"]

_CAMERA_PREFIX: Final = "dlstreamer-"
_UNSAFE_NAME_CHARS: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_STEM_CHARS: Final = 40


class DLStreamerAdapter(Adapter):
    """Reads DL Streamer ``gvametapublish`` lines, one event per object."""

    name = "dlstreamer"

    def to_events(self, payload: bytes, context: AdapterContext) -> list[JsonObject]:
        """Return one event per object of a DL Streamer line."""
        line = decode_object(payload)
        objects = _objects(line)
        offset_ns = _stream_offset_ns(line)
        event_time_ms = _event_time_ms(context)
        camera_id = camera_from_key(context.key) or camera_from_source(
            optional_str(line, "source") or ""
        )

        return [
            self._event(
                detected,
                index=index,
                camera_id=camera_id,
                offset_ns=offset_ns,
                event_time_ms=event_time_ms,
            )
            for index, detected in enumerate(objects)
        ]

    def _event(
        self,
        detected: object,
        *,
        index: int,
        camera_id: str,
        offset_ns: int,
        event_time_ms: int,
    ) -> JsonObject:
        if not isinstance(detected, dict):
            raise RejectedEvent("wrong_type", f"objects[{index}] is not an object")
        detection = get_object(detected, "detection")
        label = optional_str(detection, "label") or optional_str(detected, "roi_type")

        return {
            "event_id": stable_id(camera_id, offset_ns, index),
            "detector": detector_for_label(label or ""),
            "source": self.name,
            "camera_id": camera_id,
            "event_time_ms": event_time_ms,
            "label": label or "object",
            "confidence": get_number(detection, "confidence"),
            "tracker_id": _tracker_id(detected),
            "bbox": _normalised_bbox(detection),
            "bbox_px": _pixel_bbox(detected),
            "attributes": _attributes(detection, offset_ns=offset_ns, index=index),
        }


def camera_from_source(source: str) -> str:
    """Return a short camera id that is the same for every line of one source.

    The file or path name of the source URI makes it readable; a hash of the
    whole URI keeps two streams with the same file name apart, e.g.
    ``dlstreamer-person-bicycle-car-detection-3f2a9c1e``.
    """
    try:
        path = urlsplit(source).path
    except ValueError:  # e.g. a malformed IPv6 host: the name is in the hash
        path = ""
    stem = PurePosixPath(path).stem
    stem = _UNSAFE_NAME_CHARS.sub("-", stem).strip("-.")[:_MAX_STEM_CHARS]
    digest = stable_id(source)[:8]
    return f"{_CAMERA_PREFIX}{stem}-{digest}" if stem else f"{_CAMERA_PREFIX}{digest}"


def _objects(line: JsonObject) -> list[object]:
    objects = line.get("objects", [])
    if not isinstance(objects, list):
        raise RejectedEvent("wrong_type", "'objects' must be a list")
    return objects


def _stream_offset_ns(line: JsonObject) -> int:
    offset_ns = line.get("timestamp")
    if offset_ns is None:
        raise RejectedEvent("missing_field", "'timestamp' is missing")
    if isinstance(offset_ns, bool) or not isinstance(offset_ns, int):
        raise RejectedEvent("wrong_type", "'timestamp' must be an integer of ns")
    if offset_ns < 0:
        raise RejectedEvent("bad_timestamp", f"negative stream offset: {offset_ns}")
    return offset_ns


def _event_time_ms(context: AdapterContext) -> int:
    if context.record_timestamp_ms is None:
        raise RejectedEvent(
            "missing_time",
            "DL Streamer times are relative to the stream start and the record "
            "has no timestamp",
        )
    return context.record_timestamp_ms


def _tracker_id(detected: JsonObject) -> str | None:
    tracker_id = detected.get("id")
    if isinstance(tracker_id, bool) or not isinstance(tracker_id, int | str):
        return None
    return str(tracker_id)


def _normalised_bbox(detection: JsonObject) -> JsonObject | None:
    box = get_object(detection, "bounding_box", required=False)
    if not box:
        return None
    return {name: box.get(name) for name in ("x_min", "y_min", "x_max", "y_max")}


def _pixel_bbox(detected: JsonObject) -> JsonObject | None:
    x, y = get_number(detected, "x"), get_number(detected, "y")
    width, height = get_number(detected, "w"), get_number(detected, "h")
    if x is None or y is None or width is None or height is None:
        return None
    return {"x_min": x, "y_min": y, "x_max": x + width, "y_max": y + height}


def _attributes(detection: JsonObject, *, offset_ns: int, index: int) -> JsonObject:
    attributes: JsonObject = {"stream_offset_ns": offset_ns, "object_index": index}
    label_id = detection.get("label_id")
    if isinstance(label_id, int) and not isinstance(label_id, bool):
        attributes["label_id"] = label_id
    return attributes
