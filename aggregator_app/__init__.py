"""Event aggregation service for video analytics, on faust-streaming."""

from aggregator_app.app import app

__all__ = ["app"]
