"""Every form of one instant gives one epoch-ms value; bad timestamps are rejected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator_app.exceptions import RejectedEvent
from aggregator_app.timeparse import MAX_EPOCH_MS, to_epoch_ms

# 2021-06-11T23:36:23.526Z, the start of a Frigate event of the fixtures.
INSTANT_MS = 1_623_454_583_526

SAME_INSTANT = [
    1_623_454_583.526,
    "1623454583.526",
    INSTANT_MS,
    float(INSTANT_MS),
    str(INSTANT_MS),
    INSTANT_MS * 1000,
    INSTANT_MS * 1_000_000,
    f"{INSTANT_MS * 1_000_000}",
    "1.623454583526e9",
    " 1623454583526 ",
    "2021-06-11T23:36:23.526Z",
    "2021-06-11T23:36:23.526+00:00",
    "2021-06-12T01:36:23.526+02:00",
    "2021-06-11T18:36:23.526-05:00",
    "2021-06-11T23:36:23.526000Z",
    "2021-06-11T23:36:23.5260001Z",
    "2021-06-11 23:36:23.526Z",
    "20210611T233623.526Z",
    "2021-06-11T23:36:23.526",
]


@pytest.mark.parametrize("value", SAME_INSTANT, ids=repr)
def test_every_form_of_one_instant_gives_one_value(value: object) -> None:
    assert to_epoch_ms(value, naive="utc") == INSTANT_MS


def test_deepstream_timestamp() -> None:
    assert to_epoch_ms("2018-09-12T17:20:38.026Z", naive="reject") == 1_536_772_838_026


@pytest.mark.parametrize(
    ("value", "expected_ms"),
    [
        (0, 0),
        (1, 1000),
        (99_999_999_999, 99_999_999_999_000),
        (100_000_000_000, 100_000_000_000),
        (99_999_999_999_999, 99_999_999_999_999),
        (100_000_000_000_000, 100_000_000_000),
        (100_000_000_000_000_000, 100_000_000_000),
        (1_500_000_000_000_499_999, 1_500_000_000_000),
        (1_500_000_000_000_500_000, 1_500_000_000_001),
        (1_500_000_000_000_499, 1_500_000_000_000),
        (1_500_000_000_000_500, 1_500_000_000_001),
        (1_500_000_000.0005, 1_500_000_000_001),
        (1_500_000_000.0004, 1_500_000_000_000),
        ("2021-06-11T23:36:23.5265Z", 1_623_454_583_527),
        ("2021-06-11T23:36:23.5264999Z", 1_623_454_583_526),
    ],
    ids=repr,
)
def test_unit_thresholds_and_rounding(value: object, expected_ms: int) -> None:
    assert to_epoch_ms(value, naive="utc") == expected_ms


def test_naive_iso_is_utc_or_rejected() -> None:
    assert to_epoch_ms("2021-06-11T23:36:23.526", naive="utc") == INSTANT_MS

    with pytest.raises(RejectedEvent) as caught:
        to_epoch_ms("2021-06-11T23:36:23.526", naive="reject")

    assert caught.value.reason == "bad_timestamp"
    assert "offset" in caught.value.detail


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        float("nan"),
        float("inf"),
        float("-inf"),
        "NaN",
        "Infinity",
        "-inf",
        -1,
        -0.5,
        "-1623454583",
        "1969-12-31T23:59:59Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "",
        "   ",
        "yesterday",
        "2021-13-01T00:00:00Z",
        "2021-06-11T23:36:23Zjunk",
        "1e400000000",
        "0x5f",
        10**40,
        1e300,
        (MAX_EPOCH_MS + 1) * 1_000_000,
        None,
        [1623454583],
        {"seconds": 1},
        b"1623454583",
    ],
    ids=repr,
)
def test_rejects(value: object) -> None:
    with pytest.raises(RejectedEvent) as caught:
        to_epoch_ms(value, naive="utc")

    assert caught.value.reason == "bad_timestamp"


# Numbers are unambiguous from 1e11 ms (1973-03-03) to 1e11 s (5138-11-16).
instants_ms = st.integers(min_value=10**11, max_value=10**14 - 1)


@given(instant_ms=instants_ms, offset_min=st.integers(-14 * 60, 14 * 60))
def test_property_all_forms_agree(instant_ms: int, offset_min: int) -> None:
    moment = datetime.fromtimestamp(0, UTC) + timedelta(milliseconds=instant_ms)
    local = moment.astimezone(timezone(timedelta(minutes=offset_min)))
    forms: list[object] = [
        instant_ms / 1000,
        f"{instant_ms // 1000}.{instant_ms % 1000:03d}",
        instant_ms,
        float(instant_ms),
        str(instant_ms),
        instant_ms * 1000,
        instant_ms * 1_000_000,
        moment.isoformat().replace("+00:00", "Z"),
        local.isoformat(),
    ]

    values = {to_epoch_ms(form, naive="reject") for form in forms}

    assert values == {instant_ms}


@given(
    instant_ms=instants_ms,
    sub_ms=st.integers(min_value=0, max_value=999_999),
)
def test_property_sub_millisecond_rounds_half_up(instant_ms: int, sub_ms: int) -> None:
    nanoseconds = instant_ms * 1_000_000 + sub_ms
    expected_ms = instant_ms + (1 if sub_ms >= 500_000 else 0)

    assert to_epoch_ms(nanoseconds, naive="utc") == expected_ms
    assert to_epoch_ms(str(nanoseconds), naive="utc") == expected_ms


@given(value=st.one_of(st.floats(), st.integers(), st.text(max_size=40)))
def test_property_only_rejects_or_returns_in_range(value: object) -> None:
    try:
        epoch_ms = to_epoch_ms(value, naive="utc")
    except RejectedEvent as exc:
        assert exc.reason == "bad_timestamp"
    else:
        assert 0 <= epoch_ms <= MAX_EPOCH_MS
