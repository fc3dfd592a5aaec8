"""The pure parts of the live streams: cursors, filters, a subscriber's queue."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict

from aggregator_app.exceptions import InvalidQuery
from aggregator_app.live.cursor import format_cursor, parse_cursor
from aggregator_app.live.filters import Facets, StreamFilter, facets_of
from aggregator_app.live.hub import Decoded, Item, Subscriber


@given(st.lists(st.integers(min_value=0, max_value=2**62), min_size=1, max_size=40))
def test_a_cursor_reads_back_as_written(offsets: list[int]) -> None:
    text = format_cursor("a", offsets)
    assert parse_cursor(text, stream="a", partitions=len(offsets)) == offsets


@pytest.mark.parametrize(
    "text", ["a:1.2.3", "d:1.2.3.4", "a:1.2.x.4", "a:1.2.-3.4", "1.2.3.4", "a:"]
)
def test_a_cursor_of_another_stream_or_shape_is_refused(text: str) -> None:
    with pytest.raises(InvalidQuery):
        parse_cursor(text, stream="a", partitions=4)


def observation(**fields: object) -> dict[str, object]:
    inner = {"camera_id": "cam-1", "zone_id": "z1", "confidence": 0.8}
    return (
        {"type": "observation", "camera_id": "cam-1", "site_id": "lab"}
        | {"event": inner}
        | fields
    )


def test_facets_come_from_the_top_or_from_the_inner_event() -> None:
    facets = facets_of(observation())
    assert facets == Facets("observation", "cam-1", "lab", "z1", 0.8)
    top = facets_of(observation(type="correlated", zone_id="z9", confidence=0.1))
    assert (top.type, top.zone_id, top.confidence) == ("correlated", "z9", 0.1)


def test_filters_combine_values_and_parameters() -> None:
    query = MultiDict(
        [("type", "observation,correlated"), ("camera", "cam-1"), ("camera", "cam-2")]
    )
    query.add("min_confidence", "0.5")
    wanted = StreamFilter.from_query(query)

    assert wanted.matches(facets_of(observation()))
    assert not wanted.matches(facets_of(observation(camera_id="cam-3")))
    assert not wanted.matches(facets_of(observation(type="action")))
    assert not wanted.matches(facets_of(observation(confidence=0.4)))
    no_confidence = Facets("observation", "cam-1", None, None, None)
    assert not wanted.matches(no_confidence)
    assert StreamFilter().matches(no_confidence)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"colour": "red"}, "unknown parameter"),
        ({"min_confidence": "1.5"}, "min_confidence"),
        ({"min_confidence": "nan"}, "min_confidence"),
        ({"camera": "a b"}, "camera"),
        ({"zone": "x" * 300}, "zone"),
    ],
)
def test_unusable_filters_are_refused_with_a_reason(
    query: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidQuery, match=message):
        StreamFilter.from_query(MultiDict(query))


def item(index: int, offset: int, camera: str = "cam-1") -> Item:
    facets = (Facets("observation", camera, None, None, None),)
    decoded = Decoded(kind="aggregated", body=b"{}", facets=facets)
    return Item(index=index, offset=offset, cursor="a:0", decoded=decoded)


async def test_a_full_queue_drops_the_subscriber_once() -> None:
    dropped: list[str] = []
    subscriber = Subscriber(
        filter=StreamFilter(cameras=frozenset({"cam-1"})),
        queue=asyncio.Queue(maxsize=2),
        floor=[5, 0],
    )
    subscriber.on_drop = lambda: dropped.append(subscriber.dropped_reason or "")

    assert not subscriber.offer(0, 4, item(0, 4))  # below the floor: had it
    assert not subscriber.offer(1, 0, item(1, 0, camera="cam-2"))  # filtered
    assert subscriber.offer(0, 5, item(0, 5))
    assert subscriber.offer(1, 1, item(1, 1))
    assert not subscriber.offer(1, 2, item(1, 2))
    assert not subscriber.offer(1, 3, item(1, 3))

    assert dropped == ["too slow: 2 events waiting"]
    assert subscriber.queue.qsize() == 2


def test_frames_carry_the_cursor() -> None:
    one = Item(
        index=0,
        offset=7,
        cursor="a:8.0",
        decoded=Decoded(kind="aggregated", body=b'{"type":"x"}', facets=()),
    )
    assert one.sse_frame == b'id: a:8.0\ndata: {"type":"x"}\n\n'
    assert one.ws_text == '{"cursor":"a:8.0","kind":"aggregated","event":{"type":"x"}}'
