"""The adapter contract, and the helpers every adapter shares.

An adapter turns one Kafka record value of one producer's format into the
fields of zero or more :class:`~aggregator_app.schema.DetectorEvent`. It returns
plain dicts, not models: ingest validates them, enriches them from the rules
and checks them in one place, so the adapters stay free of policy. An adapter
raises only :class:`~aggregator_app.exceptions.RejectedEvent`, with a stable
reason code, for a payload it cannot read.
"""

from __future__ import annotations

import abc
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import orjson

from aggregator_app.exceptions import RejectedEvent
from aggregator_app.timeparse import NaivePolicy
from rules.config import SourceConfig

__all__ = [
    "Adapter",
    "AdapterContext",
    "JsonObject",
    "camera_from_key",
    "decode_object",
    "detector_for_label",
    "get_number",
    "get_object",
    "optional_str",
    "require_str",
    "stable_id",
]

JsonObject = dict[str, Any]

_VEHICLE_LABELS: Final = frozenset({"car", "truck", "bus", "motorcycle", "vehicle"})
_NON_FINITE_TOKEN: Final = re.compile(rb'(?<![\w"])-?(?:NaN|Infinity)(?![\w"])')


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What an adapter may know besides the payload.

    Attributes:
        source: the configured source that the record came from.
        key: the Kafka record key, as sent.
        record_timestamp_ms: the Kafka record timestamp, set by the producer
            when it published (UTC epoch ms), if any.
        naive_timestamps: how to read an ISO time without a UTC offset.
    """

    source: SourceConfig
    key: bytes | None = None
    record_timestamp_ms: int | None = None
    naive_timestamps: NaivePolicy = "utc"


class Adapter(abc.ABC):
    """Reads one producer's messages."""

    name: ClassVar[str]

    @abc.abstractmethod
    def to_events(self, payload: bytes, context: AdapterContext) -> list[JsonObject]:
        """Return the DetectorEvent fields of every detection in a payload.

        Args:
            payload: the Kafka record value, never empty.
            context: the source and the record's key and timestamp.

        Returns:
            One dict of DetectorEvent fields per detection, not validated yet;
            an empty list when the payload holds no detection.

        Raises:
            RejectedEvent: the payload cannot be read.
        """


def decode_object(payload: bytes) -> JsonObject:
    """Parse a JSON payload that must hold one object.

    Raises:
        RejectedEvent: ``non_finite_number`` for a ``NaN`` or ``Infinity``
            literal (valid in Python's json, not in JSON), ``broken_json`` for
            any other parse error, ``wrong_type`` for JSON that is not an object.
    """
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _json_error(payload, exc) from None

    if not isinstance(decoded, dict):
        kind = _JSON_KINDS.get(type(decoded), type(decoded).__name__)
        raise RejectedEvent("wrong_type", f"payload is JSON {kind}, not an object")
    return decoded


#: How JSON names what a payload decoded to (Python's names are not JSON's).
_JSON_KINDS = {
    type(None): "null",
    bool: "true or false",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
}


def _json_error(payload: bytes, exc: orjson.JSONDecodeError) -> RejectedEvent:
    # Only on the error path: look for what a Python producer writes for NaN.
    if "infinity" in str(exc) or _NON_FINITE_TOKEN.search(payload):
        return RejectedEvent(
            "non_finite_number",
            f"JSON holds NaN or Infinity, which JSON forbids: {exc}",
        )
    if "utf-8" in str(exc).lower():
        return RejectedEvent("broken_json", f"payload is not UTF-8 text: {exc}")
    return RejectedEvent("broken_json", str(exc))


def get_object(parent: JsonObject, key: str, *, required: bool = True) -> JsonObject:
    """Return ``parent[key]``, which must be a JSON object.

    Raises:
        RejectedEvent: ``missing_field`` when absent (and required),
            ``wrong_type`` when not an object.
    """
    value = parent.get(key)
    if value is None:
        if required:
            raise RejectedEvent("missing_field", f"{key!r} is missing")
        return {}
    if not isinstance(value, dict):
        raise _wrong_type(key, "an object", value)
    return value


def require_str(parent: JsonObject, key: str) -> str:
    """Return ``parent[key]``, which must be a non-empty string.

    Raises:
        RejectedEvent: ``missing_field`` when absent or empty, ``wrong_type``
            when not a string.
    """
    value = optional_str(parent, key)
    if value is None:
        raise RejectedEvent("missing_field", f"{key!r} is missing or empty")
    return value


def optional_str(parent: JsonObject, key: str) -> str | None:
    """Return ``parent[key]``, a string, or ``None`` when absent or empty.

    Raises:
        RejectedEvent: ``wrong_type`` when present but not a string.
    """
    value = parent.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _wrong_type(key, "a string", value)
    return value


def get_number(parent: JsonObject, key: str) -> float | None:
    """Return ``parent[key]``, a finite number, or ``None`` when absent.

    Raises:
        RejectedEvent: ``wrong_type`` for a bool or non-number,
            ``non_finite_number`` for NaN or infinity.
    """
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(key, "a number", value)
    if not math.isfinite(value):
        raise RejectedEvent("non_finite_number", f"{key!r} is {value!r}")
    return value


def camera_from_key(key: bytes | None) -> str | None:
    """Return the camera id that a Kafka key names, or ``None`` without a key.

    Raises:
        RejectedEvent: ``wrong_type`` when the key is not UTF-8.
    """
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise RejectedEvent("wrong_type", "the Kafka key is not UTF-8") from None


def detector_for_label(label: str, *, default: str = "object") -> str:
    """Return the detector kind that a class label implies."""
    lowered = label.lower()
    if lowered in ("person", "face"):
        return lowered
    if lowered in _VEHICLE_LABELS:
        return "vehicle"
    return default


def stable_id(*parts: object) -> str:
    """Return a 32-hex-digit id that is the same whenever the parts are."""
    text = "\x1f".join(str(part) for part in parts)
    return hashlib.sha1(
        text.encode("utf-8", "surrogatepass"), usedforsecurity=False
    ).hexdigest()[:32]


def _wrong_type(key: str, expected: str, value: object) -> RejectedEvent:
    return RejectedEvent(
        "wrong_type", f"{key!r} must be {expected}, not {type(value).__name__}"
    )
