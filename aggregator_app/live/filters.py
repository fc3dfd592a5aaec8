"""What a live-stream client asks to see: filters read from its query string.

``type``, ``camera``, ``site`` and ``zone`` take one value or several (the
parameter repeated, or values joined by commas); an event passes when it
matches one of the values of each filter given. ``min_confidence`` (0..1)
lets through events whose confidence is at least that; an event without a
confidence does not pass it. Any other parameter, or an unusable value, is
a 400 with a message that says which.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from aggregator_app.exceptions import InvalidQuery

__all__ = ["CONTROL_PARAMS", "Facets", "StreamFilter", "facets_of"]

#: Parameters of a stream request that are not filters.
CONTROL_PARAMS = frozenset({"token", "cursor", "source"})

_VALUE = re.compile(r"^[A-Za-z0-9_.:@/+\-]{1,256}$")
_MAX_VALUES = 256
_FILTERS = ("type", "camera", "site", "zone")


@dataclass(frozen=True, slots=True)
class Facets:
    """What a filter looks at in one event."""

    type: str
    camera_id: str | None
    site_id: str | None
    zone_id: str | None
    confidence: float | None


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """The filters of one client; an empty set lets every value through."""

    types: frozenset[str] = frozenset()
    cameras: frozenset[str] = frozenset()
    sites: frozenset[str] = frozenset()
    zones: frozenset[str] = frozenset()
    min_confidence: float | None = None

    @classmethod
    def from_query(cls, query: MultiMapping[str]) -> StreamFilter:
        """Return the filter a query string asks for.

        Raises:
            InvalidQuery: an unknown parameter, or a value that cannot be used.
        """
        known = CONTROL_PARAMS | set(_FILTERS) | {"min_confidence"}
        unknown = sorted(set(query) - known)
        if unknown:
            raise InvalidQuery(
                f"unknown parameter(s): {', '.join(unknown)}; filters are "
                "type, camera, site, zone, min_confidence"
            )
        values = {name: _values(name, query.getall(name, [])) for name in _FILTERS}
        return cls(
            types=values["type"],
            cameras=values["camera"],
            sites=values["site"],
            zones=values["zone"],
            min_confidence=_confidence(query.getall("min_confidence", [])),
        )

    def matches(self, facets: Facets) -> bool:
        """Return whether an event with these facets passes every filter."""
        if self.types and facets.type not in self.types:
            return False
        if self.cameras and facets.camera_id not in self.cameras:
            return False
        if self.sites and facets.site_id not in self.sites:
            return False
        if self.zones and facets.zone_id not in self.zones:
            return False
        if self.min_confidence is not None:
            return (
                facets.confidence is not None
                and facets.confidence >= self.min_confidence
            )
        return True

    def matches_any(self, facets: Iterable[Facets]) -> bool:
        """Return whether one of several events passes."""
        return any(self.matches(one) for one in facets)


def _values(name: str, raw: list[str]) -> frozenset[str]:
    values = [value.strip() for text in raw for value in text.split(",")]
    values = [value for value in values if value]
    if len(values) > _MAX_VALUES:
        raise InvalidQuery(f"{name}: at most {_MAX_VALUES} values")
    for value in values:
        if not _VALUE.match(value):
            raise InvalidQuery(
                f"{name}: {value[:80]!r} is not an identifier "
                "(letters, digits and _ . : @ / + -, at most 256)"
            )
    return frozenset(values)


def _confidence(raw: list[str]) -> float | None:
    if not raw:
        return None
    if len(raw) > 1:
        raise InvalidQuery("min_confidence: give it once")
    try:
        value = float(raw[0])
    except ValueError:
        raise InvalidQuery(
            f"min_confidence must be a number in [0, 1], not {raw[0][:40]!r}"
        ) from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidQuery(f"min_confidence must be in [0, 1], not {raw[0][:40]!r}")
    return value


def facets_of(event: Mapping[str, Any], *, type_field: str = "type") -> Facets:
    """Return the facets of an event as published (JSON decoded).

    A field missing at the top is looked for in the inner ``event`` (an
    observation carries its detector event there), so that event types that
    are not observations filter alike whichever level they put a field at.
    """
    inner = event.get("event")
    inner = inner if isinstance(inner, Mapping) else {}

    def field(name: str) -> Any:
        value = event.get(name)
        return inner.get(name) if value is None else value

    confidence = field("confidence")
    return Facets(
        type=str(event.get(type_field, "")),
        camera_id=_text(field("camera_id")),
        site_id=_text(field("site_id")),
        zone_id=_text(field("zone_id")),
        confidence=float(confidence) if isinstance(confidence, int | float) else None,
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
