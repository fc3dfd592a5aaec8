"""Payloads that are already a :class:`~aggregator_app.schema.DetectorEvent`.

A producer that speaks the unified schema (``docs/event-schema.json``) needs no
translation: its JSON object is passed on as it is, to be validated by ingest.
"""

from __future__ import annotations

from aggregator_app.adapters.base import (
    Adapter,
    AdapterContext,
    JsonObject,
    decode_object,
)

__all__ = ["UnifiedAdapter"]


class UnifiedAdapter(Adapter):
    """Reads DetectorEvent JSON objects."""

    name = "unified"

    def to_events(self, payload: bytes, context: AdapterContext) -> list[JsonObject]:
        """Return the payload's object as the fields of one event."""
        return [decode_object(payload)]
