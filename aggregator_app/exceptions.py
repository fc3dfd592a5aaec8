"""Errors raised by the aggregation service.

Every error the service raises on purpose derives from :class:`AggregatorError`::

    AggregatorError
    ├── ConfigError             the rules file or a setting is invalid (at load time)
    ├── RejectedEvent           one input message cannot become an event (dead-lettered)
    ├── InvalidQuery            a web request's parameters cannot be used (HTTP 400)
    │   └── StreamUnavailable   a live stream cannot be read now (HTTP 503)
    └── StoreError              the event store failed (``retriable``: try again?)
        └── StoreUnavailable    the store cannot be reached right now

Driver and client exceptions are mapped to these at the boundary that calls the
driver, re-raised ``from`` the original.
"""

from __future__ import annotations

__all__ = [
    "AggregatorError",
    "ConfigError",
    "InvalidQuery",
    "RejectedEvent",
    "StoreError",
    "StoreUnavailable",
    "StreamUnavailable",
]


class AggregatorError(Exception):
    """Root of every error raised on purpose by this service."""


class ConfigError(AggregatorError):
    """The rules file or a setting is invalid."""


class RejectedEvent(AggregatorError):
    """An input message that cannot become an event.

    ``reason`` is a short stable code (``broken_json``, ``invalid_field``,
    ``too_large``, ``clock_skew``, ``unknown_detector``, ...), used as a metric
    label and stored in the dead-letter record; ``detail`` says what exactly was
    wrong, for a person.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidQuery(AggregatorError):
    """A request to a web view whose parameters cannot be used.

    ``status`` is the HTTP status to answer with; the message says what is wrong.
    """

    status = 400


class StreamUnavailable(InvalidQuery):
    """A live stream cannot be read now (the broker does not answer)."""

    status = 503


class StoreError(AggregatorError):
    """The event store failed."""

    retriable = False


class StoreUnavailable(StoreError):
    """The event store cannot be reached right now; try again later."""

    retriable = True
