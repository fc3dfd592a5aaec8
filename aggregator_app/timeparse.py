"""Turn the timestamps that producers send into UTC epoch milliseconds.

Producers disagree on how to say "when": epoch seconds as a float (Frigate),
ISO 8601 strings (DeepStream), nanoseconds, numbers inside strings. Everything
after ingest uses one form, an ``int`` of UTC epoch milliseconds, and every form
of one instant gives that same ``int``.

A bare number carries no unit, so the unit is chosen by magnitude:

==========================  ============  ====================================
value                       read as       instants it can express
==========================  ============  ====================================
``< 1e11``                  seconds       1970 .. 5138-11-16
``1e11 <= v < 1e14``        milliseconds  1973-03-03 .. 5138-11-16
``1e14 <= v < 1e17``        microseconds  1973-03-03 .. 5138-11-16
``>= 1e17``                 nanoseconds   1973-03-03 .. 9999-12-31
==========================  ============  ====================================

So a millisecond value before March 1973 would be read as seconds; no detector
of this service has data that old. Fractions of a millisecond are rounded half
up. A string of digits (with an optional sign, fraction or exponent) is a
number; any other string must be ISO 8601. An ISO string without an offset is
read as UTC or rejected, as the caller says (``naive``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Final, Literal

from aggregator_app.exceptions import RejectedEvent

__all__ = ["MAX_EPOCH_MS", "NaivePolicy", "to_epoch_ms"]

NaivePolicy = Literal["utc", "reject"]

MAX_EPOCH_MS: Final = 253_402_300_799_999
"""The last millisecond of the year 9999, the end of ISO 8601's four-digit years."""

_SECONDS_BELOW: Final = 10**11
_MILLISECONDS_BELOW: Final = 10**14
_MICROSECONDS_BELOW: Final = 10**17

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ONE_MS: Final = Decimal(1)


def to_epoch_ms(value: object, *, naive: NaivePolicy) -> int:
    """Convert a producer's timestamp to UTC epoch milliseconds.

    Args:
        value: epoch seconds, milliseconds, microseconds or nanoseconds (an
            ``int``, ``float`` or numeric string; unit chosen by magnitude, see
            the module docstring), or an ISO 8601 string.
        naive: what an ISO string without a UTC offset means: ``"utc"`` reads it
            as UTC, ``"reject"`` rejects it.

    Returns:
        The instant as an ``int`` of milliseconds since 1970-01-01T00:00:00Z.

    Raises:
        RejectedEvent: ``bad_timestamp`` for a bool, NaN or infinity, a negative
            or out-of-range instant, an unparseable string or another type.
    """
    if isinstance(value, bool):
        raise _bad("a bool is not a timestamp", value)
    if isinstance(value, int):
        return _checked(_scale_int(value), value)
    if isinstance(value, float):
        return _checked(_scale_decimal(_float_decimal(value), value), value)
    if isinstance(value, str):
        return _checked(_from_string(value, naive=naive), value)
    raise _bad(f"unsupported type {type(value).__name__}", value)


def _from_string(text: str, *, naive: NaivePolicy) -> int:
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped):
        return _scale_decimal(Decimal(stripped), text)
    return _from_iso(stripped, naive=naive)


def _from_iso(text: str, *, naive: NaivePolicy) -> int:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _bad("neither a number nor ISO 8601", text) from None

    if moment.tzinfo is None:
        if naive == "reject":
            raise _bad("ISO 8601 time without a UTC offset", text)
        moment = moment.replace(tzinfo=UTC)

    delta = moment - _EPOCH
    whole_ms = (delta.days * 86_400 + delta.seconds) * 1000
    return whole_ms + (delta.microseconds + 500) // 1000


def _scale_int(value: int) -> int:
    if value < 0:
        raise _bad("negative", value)
    if value < _SECONDS_BELOW:
        return value * 1000
    if value < _MILLISECONDS_BELOW:
        return value
    divisor = 1000 if value < _MICROSECONDS_BELOW else 1_000_000
    return (value + divisor // 2) // divisor


def _float_decimal(value: float) -> Decimal:
    # repr() is the shortest text that reads back as this float, so 1.526 s
    # becomes exactly 1526 ms here, as the string "1.526" does.
    return Decimal(repr(value))


def _scale_decimal(value: Decimal, original: object) -> int:
    if not value.is_finite():
        raise _bad("not a finite number", original)
    if value < 0:
        raise _bad("negative", original)

    try:
        return int(_to_ms(value).quantize(_ONE_MS, rounding=ROUND_HALF_UP))
    except ArithmeticError:  # decimal's Overflow and InvalidOperation
        raise _bad("out of range", original) from None


def _to_ms(value: Decimal) -> Decimal:
    if value < _SECONDS_BELOW:
        return value * 1000
    if value < _MILLISECONDS_BELOW:
        return value
    if value < _MICROSECONDS_BELOW:
        return value / 1000
    return value / 1_000_000


def _checked(epoch_ms: int, original: object) -> int:
    if epoch_ms < 0:
        raise _bad("before 1970", original)
    if epoch_ms > MAX_EPOCH_MS:
        raise _bad("after the year 9999", original)
    return epoch_ms


def _bad(why: str, value: object) -> RejectedEvent:
    return RejectedEvent("bad_timestamp", f"{why}: {value!r:.80}")
