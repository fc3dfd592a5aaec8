"""The correlation table's layout: a busy site is many small values, not one.

The table's RocksDB store is replaced by a dict with the same three calls;
the same store runs against the real broker in
``tests/integration/test_correlation.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from aggregator_app.correlate import CameraPoint, SiteState, Track
from tables.correlation import TableSiteStore

KAFKA_RECORD_LIMIT_BYTES = 1024 * 1024


class _DictData:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def _encode_key(self, key: str) -> bytes:
        return json.dumps(key).encode()

    def _encode_value(self, value: bytes) -> bytes:
        return value  # the table's values are raw bytes

    def _set(self, key: bytes, value: bytes) -> None:
        self.values[json.loads(key)] = value

    def _del(self, key: bytes) -> None:
        self.values.pop(json.loads(key), None)

    def items(self) -> Iterator[tuple[str, bytes]]:
        return iter(list(self.values.items()))


class _DictTable:
    def __init__(self) -> None:
        self.data = _DictData()


def busy_site(tracks: int) -> SiteState:
    state = SiteState(site_id="endeavor", watermark_ms=5_000)
    for index in range(tracks):
        global_id = f"endeavor:{index:032x}"
        camera = f"10_110_7_{index % 4}_A0"
        state.tracks[global_id] = Track(
            global_id=global_id,
            site_id="endeavor",
            first_ms=index,
            last_ms=index + 10,
            member_count=3,
            member_ids=[f"{index:032x}-{member}" for member in range(3)],
            cameras={camera: CameraPoint(index, 100.0 * index, 0.0, None, None)},
            all_cameras=[camera],
            last_position=(100.0 * index, 0.0),
        )
        for member in range(3):
            event_id = f"{index:032x}-{member}"
            state.recent[event_id] = global_id
            state.recent_ms[event_id] = index + member
    return state


def test_a_site_with_thousands_of_tracks_is_written_in_small_records() -> None:
    store = TableSiteStore(_DictTable())
    state = busy_site(10_000)
    assert len(json.dumps(state.to_json())) > 3 * KAFKA_RECORD_LIMIT_BYTES

    store.put(state)
    changes = store.take_changelog()

    assert max(len(value or b"") for _key, value in changes) < 64 * 1024


def test_a_stored_site_reads_back_the_same() -> None:
    table = _DictTable()
    state = busy_site(200)
    TableSiteStore(table).put(state)

    (again,) = list(TableSiteStore(table).states())

    assert again.to_json() == state.to_json()


def test_a_second_put_writes_only_what_changed() -> None:
    store = TableSiteStore(_DictTable())
    state = busy_site(200)
    store.put(state)
    store.take_changelog()

    state.tracks["endeavor:" + "0" * 32].member_count += 1
    store.put(state)

    assert len(store.take_changelog()) == 1
