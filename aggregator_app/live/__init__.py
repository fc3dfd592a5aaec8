"""Live streams of the aggregated and detector events, and the dashboard."""

from aggregator_app.live.cursor import format_cursor, parse_cursor
from aggregator_app.live.filters import Facets, StreamFilter, facets_of
from aggregator_app.live.hub import Decoded, Gap, Hub, Item, Subscriber

__all__ = [
    "Decoded",
    "Facets",
    "Gap",
    "Hub",
    "Item",
    "StreamFilter",
    "Subscriber",
    "facets_of",
    "format_cursor",
    "parse_cursor",
]
