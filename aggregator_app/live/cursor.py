"""Stream positions: where a client is in a stream, as a string it can send back.

A stream reads every partition of its topics; a cursor holds, for each of
them in a fixed order, the offset of the next record to read. Every message
of a stream carries the cursor *after* its record, so that a client that
resumes from it reads every later record once, and no earlier one: records a
filter skipped before it are behind the cursor as well, and were not for this
client anyway.

Text form: ``<stream letter>:<offset>.<offset>...``, e.g. ``a:120.0.57.3``
for the four partitions of the aggregated topic.
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator_app.exceptions import InvalidQuery

__all__ = ["format_cursor", "parse_cursor"]

_MAX_OFFSET_DIGITS = 19


def format_cursor(stream: str, offsets: Sequence[int]) -> str:
    """Return the text of a cursor of ``stream`` at ``offsets``."""
    return f"{stream}:" + ".".join(map(str, offsets))


def parse_cursor(text: str, *, stream: str, partitions: int) -> list[int]:
    """Return the offsets of a cursor of ``stream`` over ``partitions`` partitions.

    Raises:
        InvalidQuery: the text is not such a cursor.
    """
    prefix, _, body = text.strip().partition(":")
    parts = body.split(".")
    if prefix != stream or len(parts) != partitions:
        raise InvalidQuery(
            f"cursor must be {stream}:<offset> for each of {partitions} partitions, "
            f"joined by '.', not {text[:80]!r}"
        )
    if not all(part.isdigit() and len(part) <= _MAX_OFFSET_DIGITS for part in parts):
        raise InvalidQuery(f"cursor offsets must be whole numbers: {text[:80]!r}")
    return [int(part) for part in parts]
