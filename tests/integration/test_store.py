"""The event store against real ClickHouse: a server (native) and chdb (embedded).

Every test runs on both backends, each in a database of its own. The native
backend talks to the server at ``CLICKHOUSE_TEST_URL`` (default
``clickhouse://127.0.0.1:9000``, started by ``scripts/clickhouse.sh start``); if
it does not answer, its tests fail when ``CI`` is set and are skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client

from aggregator_app.exceptions import StoreError
from aggregator_app.schema import (
    AggregatedEvent,
    DetectorEvent,
    DetectorKind,
    GroundPoint,
)
from aggregator_app.store import (
    AggregatedEventRow,
    ClickHouseStore,
    DetectorEventRow,
    EmbeddedStore,
    EventStore,
    NativeStore,
    Outcome,
    StoreWriter,
    StoreWriterService,
    aggregated_event_row,
    detector_event_row,
)
from aggregator_app.store.schema import supports_ttl
from aggregator_app.store_replay import iter_rows

pytestmark = pytest.mark.integration

NATIVE_URL = os.environ.get("CLICKHOUSE_TEST_URL", "clickhouse://127.0.0.1:9000")
DAY_MS = 86_400_000
NOW_MS = time.time_ns() // 1_000_000

StoreFactory = Callable[..., ClickHouseStore]


# Fixtures.


def _native_address() -> tuple[str, int]:
    host_port = NATIVE_URL.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    return host, int(port or 9000)


@pytest.fixture(scope="session")
def native_server() -> tuple[str, int]:
    """Return the test server's address, or fail (CI) / skip (locally) without it."""
    host, port = _native_address()
    client = Client(host=host, port=port, connect_timeout=2)
    try:
        client.execute("SELECT 1")
    except Exception as exc:
        reason = (
            f"no ClickHouse server at {host}:{port} ({exc}); "
            "start one with scripts/clickhouse.sh start"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        client.disconnect()
    return host, port


@pytest.fixture(scope="module")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Return this module's chdb directory, its engine open while the module runs.

    chdb has one engine per process: it is closed after the module so that
    other tests can open theirs elsewhere.
    """
    path = tmp_path_factory.mktemp("chdb")
    keeper = EmbeddedStore(path)
    yield path
    keeper.close()


@pytest.fixture(autouse=True)
def no_writer_thread_left() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name == "store-writer"]
    assert not left, f"writer threads left running: {left}"


@pytest.fixture(params=["native", "embedded"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(
    request: pytest.FixtureRequest, chdb_dir: Path
) -> Iterator[StoreFactory]:
    """Make stores on a fresh database (``test_<uuid>``), dropped afterwards."""
    made: list[ClickHouseStore] = []

    def make(
        backend: str,
        *,
        database: str | None = None,
        ttl_days: int | None = 30,
        ensure_schema: bool = True,
    ) -> ClickHouseStore:
        database = database or f"test_{uuid.uuid4().hex}"
        store: ClickHouseStore
        if backend == "native":
            host, port = request.getfixturevalue("native_server")
            store = NativeStore(
                host=host, port=port, database=database, ttl_days=ttl_days
            )
        else:
            store = EmbeddedStore(chdb_dir, database=database, ttl_days=ttl_days)
        made.append(store)
        if ensure_schema:
            store.ensure_schema()
        return store

    yield make

    for store in made:
        _drop_database(store)
        store.close()


def _drop_database(store: ClickHouseStore) -> None:
    try:
        _execute(store, f"DROP DATABASE IF EXISTS `{store.database}`")
    except StoreError:
        pass  # a store pointed at a closed port has nothing to drop


def _query(store: ClickHouseStore, sql: str) -> list[tuple[Any, ...]]:
    """Run a query through the backend itself, to check what it stored."""
    return store._select(sql)


def _execute(store: ClickHouseStore, sql: str) -> None:
    store._execute(sql)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Rows.


def make_events(
    count: int,
    *,
    start_ms: int = NOW_MS - 3_600_000,
    step_ms: int = 1000,
    cameras: int = 3,
    prefix: str = "ev",
) -> list[DetectorEvent]:
    return [
        DetectorEvent(
            event_id=f"{prefix}-{index}",
            detector=DetectorKind.VEHICLE,
            source="deepstream",
            camera_id=f"cam-{index % cameras}",
            event_time_ms=start_ms + index * step_ms,
            label="car",
            confidence=0.5,
            position=GroundPoint(x_m=float(index), y_m=-1.5),
        )
        for index in range(count)
    ]


def rows_of(events: Sequence[DetectorEvent]) -> list[DetectorEventRow]:
    return [detector_event_row(event, inserted_at_ms=NOW_MS) for event in events]


def aggregated_rows(
    events: Sequence[DetectorEvent], *, status: str = "open"
) -> list[AggregatedEventRow]:
    return [
        aggregated_event_row(
            AggregatedEvent(
                aggregated_id=f"agg-{event.event_id}",
                type="observation",
                status=status,  # type: ignore[arg-type]
                rule_id="dedup",
                camera_id=event.camera_id,
                detector=event.detector,
                label=event.label,
                start_time_ms=event.event_time_ms,
                end_time_ms=event.event_time_ms + 500,
                absorbed_count=0,
                event=event,
            ),
            inserted_at_ms=NOW_MS,
        )
        for event in events
    ]


# Idempotent inserts.


def test_retried_batch_is_stored_once(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    rows = rows_of(make_events(100))

    first = store.insert_detector_events(rows)
    retried = store.insert_detector_events(rows)

    assert (first, retried) == (100, 0)
    assert store.count_detector_events() == 100


def test_overlapping_batch_adds_only_new_rows(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    rows = rows_of(make_events(100))
    store.insert_detector_events(rows[:60])

    inserted = store.insert_detector_events([*rows[40:], rows[99]])

    assert inserted == 40
    assert store.count_detector_events() == 100


def test_small_batch_in_a_dense_range_is_checked_by_key(
    backend: str, store_factory: StoreFactory
) -> None:
    # 100 stored rows in the batch's time range: more than 4 x 5, so the store
    # asks for the batch's keys by name instead of reading the range.
    store = store_factory(backend)
    events = make_events(102)
    store.insert_detector_events(rows_of(events[:100]))
    store.insert_aggregated_events(aggregated_rows(events[:100]))
    batch = [events[0], events[50], events[99], events[100], events[101]]

    detector_inserted = store.insert_detector_events(rows_of(batch))
    aggregated_inserted = store.insert_aggregated_events(aggregated_rows(batch))

    assert (detector_inserted, aggregated_inserted) == (2, 2)
    assert store.count_detector_events() == 102
    assert store.count_aggregated_events() == 102


def test_batch_over_several_days_is_checked_per_day(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend, ttl_days=None)
    rows = rows_of(make_events(30, start_ms=NOW_MS - 5 * DAY_MS, step_ms=DAY_MS // 6))
    store.insert_detector_events(rows[::2])

    inserted = store.insert_detector_events(rows)

    assert inserted == 15
    assert store.count_detector_events() == 30


def test_aggregated_rows_are_keyed_by_id_and_status(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    events = make_events(10)
    opened, closed = aggregated_rows(events), aggregated_rows(events, status="closed")

    inserted = store.insert_aggregated_events(opened)
    inserted += store.insert_aggregated_events([*closed, *opened])
    retried = store.insert_aggregated_events(closed)

    assert (inserted, retried) == (20, 0)
    assert store.count_aggregated_events() == 20
    assert store.count_aggregated_events(status="closed") == 10


# Counts and fetches.


def test_counts_filter_by_camera_outcome_and_time(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    events = make_events(30)
    rows = rows_of(events[:20]) + [
        detector_event_row(
            event,
            outcome=Outcome.REPEAT,
            kept_event_id=events[0].event_id,
            inserted_at_ms=NOW_MS,
        )
        for event in events[20:]
    ]
    store.insert_detector_events(rows)
    since_ms = events[10].event_time_ms

    assert store.count_detector_events(camera_id="cam-0") == 10
    assert store.count_detector_events(outcome=Outcome.REPEAT) == 10
    assert store.count_detector_events(since_ms=since_ms) == 20
    assert store.count_detector_events(since_ms=since_ms, until_ms=since_ms + 1) == 1
    assert store.count_detector_events(camera_id="nobody") == 0


def test_fetch_returns_rows_in_event_time_order(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    events = make_events(50, step_ms=700)
    shuffled = events[1::2] + events[::2]
    store.insert_detector_events(rows_of(shuffled[:25]))
    store.insert_detector_events(rows_of(shuffled[25:]))

    fetched = store.fetch_detector_events(
        events[5].event_time_ms, events[45].event_time_ms
    )

    assert [row.event_id for row in fetched] == [e.event_id for e in events[5:45]]
    assert [row.to_event() for row in fetched] == events[5:45]


def test_fetch_filters_by_camera_and_stops_at_the_limit(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    events = make_events(30)
    store.insert_detector_events(rows_of(events))

    fetched = store.fetch_detector_events(0, NOW_MS, camera_id="cam-1", limit=4)

    assert [row.event_id for row in fetched] == ["ev-1", "ev-4", "ev-7", "ev-10"]


def test_awkward_ids_are_stored_and_found(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    events = make_events(3, prefix="it's a \\ 'quoted' \"id\" ✓")
    rows = rows_of(events)

    inserted = store.insert_detector_events(rows)
    retried = store.insert_detector_events(rows)
    fetched = store.fetch_detector_events(0, NOW_MS)

    assert (inserted, retried) == (3, 0)
    assert [row.to_event() for row in fetched] == events


def test_fetch_aggregated_orders_open_before_closed(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    events = make_events(5)
    store.insert_aggregated_events(aggregated_rows(events, status="closed"))
    store.insert_aggregated_events(aggregated_rows(events[::-1]))

    fetched = store.fetch_aggregated(0, NOW_MS)

    assert [(row.aggregated_id, row.status) for row in fetched[:4]] == [
        ("agg-ev-0", "open"),
        ("agg-ev-0", "closed"),
        ("agg-ev-1", "open"),
        ("agg-ev-1", "closed"),
    ]
    assert fetched[1].to_event().status == "closed"


# Retention.


def insert_stored_at(
    store: ClickHouseStore,
    count: int,
    *,
    start_ms: int,
    stored_at_ms: int,
    prefix: str = "ev",
) -> None:
    """Insert detector rows and their observations as if stored at ``stored_at_ms``.

    Rows ``<prefix>-<n>`` one second apart from ``start_ms``, as
    :func:`make_events` makes them. The writer never sets ``inserted_at`` (the
    server does): only a test can make a row look old. Columns not named here
    take their type's default.
    """
    numbers = (
        f"SELECT concat('{prefix}-', toString(number)) AS id, "
        "concat('cam-', toString(number % 3)) AS camera, "
        f"toUInt64({start_ms} + number * 1000) AS time_ms, "
        f"toUInt64({NOW_MS}) AS version, "
        f"toDateTime({stored_at_ms // 1000}) AS stored_at "
        f"FROM system.numbers LIMIT {count}"
    )
    _execute(
        store,
        f"INSERT INTO `{store.database}`.detector_events "
        "(event_id, camera_id, event_time_ms, version, inserted_at) "
        f"SELECT id, camera, time_ms, version, stored_at FROM ({numbers})",
    )
    _execute(
        store,
        f"INSERT INTO `{store.database}`.aggregated_events "
        "(aggregated_id, status, camera_id, event_time_ms, version, inserted_at) "
        f"SELECT concat('agg-', id), 'open', camera, time_ms, version, stored_at "
        f"FROM ({numbers})",
    )


@pytest.mark.parametrize("ttl_days", [None, 30])
def test_days_stored_over_30_days_ago_are_dropped(
    backend: str, ttl_days: int | None, store_factory: StoreFactory
) -> None:
    store = store_factory(backend, ttl_days=ttl_days)
    insert_stored_at(
        store, 10, start_ms=NOW_MS - 40 * DAY_MS, stored_at_ms=NOW_MS - 35 * DAY_MS
    )
    # An old recording replayed today is kept as long as live data.
    replayed = make_events(10, start_ms=NOW_MS - 45 * DAY_MS, prefix="replayed")
    recent = make_events(10, start_ms=NOW_MS - 3_600_000, prefix="recent")
    store.insert_detector_events(rows_of(replayed + recent))
    store.insert_aggregated_events(aggregated_rows(replayed))

    dropped = store.drop_partitions_older_than(30)
    dropped_again = store.drop_partitions_older_than(30)

    # On a server with TTL a merge may have removed the expired rows first.
    assert dropped in (0, 1, 2) and dropped_again == 0
    expired_since_ms = NOW_MS - 40 * DAY_MS
    assert (
        store.count_detector_events(
            since_ms=expired_since_ms, until_ms=expired_since_ms + DAY_MS
        )
        == 0
    )
    assert store.count_detector_events() == 20
    assert store.count_aggregated_events() == 10


def test_the_partition_drop_alone_removes_expired_days(
    backend: str, store_factory: StoreFactory
) -> None:
    # No TTL: what goes is gone by the job, on every server.
    store = store_factory(backend, ttl_days=None)
    insert_stored_at(
        store, 10, start_ms=NOW_MS - 40 * DAY_MS, stored_at_ms=NOW_MS - 35 * DAY_MS
    )
    assert store.count_detector_events() == 10

    dropped = store.drop_partitions_older_than(30)

    assert dropped == 2  # one day in each table
    assert store.count_detector_events() == 0
    assert store.count_aggregated_events() == 0


def test_a_day_with_one_recent_row_is_kept_whole_by_the_job(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend, ttl_days=None)
    day_ms = NOW_MS - 40 * DAY_MS
    insert_stored_at(store, 5, start_ms=day_ms, stored_at_ms=day_ms)
    store.insert_detector_events(rows_of(make_events(1, start_ms=day_ms, prefix="new")))

    assert store.drop_partitions_older_than(30) == 1  # aggregated_events only
    assert store.count_detector_events() == 6


def test_ttl_removes_expired_rows_at_a_merge_where_the_server_has_it(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend, ttl_days=30)
    version = str(_query(store, "SELECT version()")[0][0])
    day_ms = NOW_MS - 40 * DAY_MS
    insert_stored_at(store, 5, start_ms=day_ms, stored_at_ms=NOW_MS - 35 * DAY_MS)
    store.insert_detector_events(rows_of(make_events(1, start_ms=day_ms, prefix="new")))

    _execute(store, f"OPTIMIZE TABLE `{store.database}`.detector_events FINAL")

    # 18.16 has no TTL: its expired rows wait for the whole day to expire.
    assert store.count_detector_events() == (1 if supports_ttl(version) else 6)


def test_tables_get_ttl_where_the_server_has_it(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    version = str(_query(store, "SELECT version()")[0][0])

    ddl = str(
        _query(store, f"SHOW CREATE TABLE `{store.database}`.detector_events")[0][0]
    )

    assert ("TTL inserted_at + toIntervalDay(30)" in ddl) is supports_ttl(version)


def test_ensure_schema_twice_keeps_the_rows(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    store.insert_detector_events(rows_of(make_events(5)))

    store.ensure_schema()

    assert store.count_detector_events() == 5


# The writer.


class SwitchableStore(EventStore):
    """Passes every call to ``target``, which a test swaps to end an outage."""

    def __init__(self, target: EventStore) -> None:
        self.target = target

    def ensure_schema(self) -> None:
        self.target.ensure_schema()

    def insert_detector_events(self, rows: Sequence[DetectorEventRow]) -> int:
        return self.target.insert_detector_events(rows)

    def insert_aggregated_events(self, rows: Sequence[AggregatedEventRow]) -> int:
        return self.target.insert_aggregated_events(rows)

    def count_detector_events(self, **filters: Any) -> int:
        return self.target.count_detector_events(**filters)

    def count_aggregated_events(self, **filters: Any) -> int:
        return self.target.count_aggregated_events(**filters)

    def fetch_detector_events(
        self, *args: Any, **kwargs: Any
    ) -> list[DetectorEventRow]:
        return self.target.fetch_detector_events(*args, **kwargs)

    def fetch_aggregated(self, *args: Any, **kwargs: Any) -> list[AggregatedEventRow]:
        return self.target.fetch_aggregated(*args, **kwargs)

    def drop_partitions_older_than(
        self, days: int, *, now_ms: int | None = None
    ) -> int:
        return self.target.drop_partitions_older_than(days, now_ms=now_ms)

    def close(self) -> None:
        self.target.close()


@pytest.fixture
def writer_factory(tmp_path: Path) -> Iterator[Callable[..., StoreWriter]]:
    """Make writers with short timings; every one is stopped afterwards."""
    made: list[StoreWriter] = []

    def make(store: EventStore, **overrides: Any) -> StoreWriter:
        settings: dict[str, Any] = {
            "spool_dir": tmp_path / "spool",
            "max_buffer_rows": 60,
            "batch_rows": 25,
            "flush_interval_ms": 20,
            "retry_initial_ms": 20,
            "retry_max_ms": 100,
        }
        settings.update(overrides)
        writer = StoreWriter(store, **settings)
        made.append(writer)
        return writer

    yield make

    for writer in made:
        writer.stop(timeout_s=1.0)


def _down_store() -> NativeStore:
    """A store on a port nothing listens on: every call is StoreUnavailable."""
    return NativeStore(port=_closed_port(), connect_timeout_s=0.5)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_writer_survives_an_outage_and_writes_the_backlog(
    backend: str,
    store_factory: StoreFactory,
    writer_factory: Callable[..., StoreWriter],
    tmp_path: Path,
) -> None:
    store = store_factory(backend)
    switch = SwitchableStore(_down_store())
    writer = writer_factory(switch)
    writer.start()

    writer.submit_detector(rows_of(make_events(150)))
    writer.submit_aggregated(aggregated_rows(make_events(10)))
    _wait_for(lambda: writer.last_error is not None)
    assert writer.backlog_rows == 160
    assert writer.rows_spooled == 100  # all that did not fit in 60 buffered rows
    assert list((tmp_path / "spool").glob("*.jsonl"))

    switch.target = store
    assert writer.flush(timeout_s=20.0)

    assert store.count_detector_events() == 150
    assert store.count_aggregated_events() == 10
    assert writer.rows_written == 160
    assert writer.last_error is None
    assert not list((tmp_path / "spool").glob("*.jsonl"))


def test_rows_left_at_stop_are_written_by_the_next_writer(
    backend: str,
    store_factory: StoreFactory,
    writer_factory: Callable[..., StoreWriter],
) -> None:
    store = store_factory(backend)
    rows = rows_of(make_events(40))
    down_writer = writer_factory(_down_store())
    down_writer.start()
    down_writer.submit_detector(rows)

    down_writer.stop(timeout_s=0.2)
    assert down_writer.backlog_rows == 40  # all on disk now

    writer = writer_factory(store)
    writer.start()
    writer.submit_detector(rows[:10])  # the agent re-sends some after a restart
    assert writer.flush(timeout_s=20.0)

    assert store.count_detector_events() == 40
    assert writer.rows_written == 40


def test_writer_batches_without_blocking_the_caller(
    backend: str,
    store_factory: StoreFactory,
    writer_factory: Callable[..., StoreWriter],
) -> None:
    store = store_factory(backend)
    writer = writer_factory(store, max_buffer_rows=10_000, batch_rows=500)
    writer.start()

    started_s = time.monotonic()
    for start in range(0, 2000, 100):
        writer.submit_detector(rows_of(make_events(100, prefix=f"b{start}")))
    submit_s = time.monotonic() - started_s
    writer.stop(timeout_s=20.0)

    assert submit_s < 0.5
    assert writer.rows_spooled == 0
    assert store.count_detector_events() == 2000


def test_refused_batch_is_kept_for_an_operator(
    backend: str,
    store_factory: StoreFactory,
    writer_factory: Callable[..., StoreWriter],
    tmp_path: Path,
) -> None:
    store = store_factory(backend)
    writer = writer_factory(store)
    writer.start()
    bad = dataclasses.replace(aggregated_rows(make_events(1))[0], status="bogus")

    writer.submit_aggregated([bad])
    writer.submit_detector(rows_of(make_events(5)))
    assert writer.flush(timeout_s=20.0)

    assert store.count_detector_events() == 5
    assert store.count_aggregated_events() == 0
    assert writer.rows_failed == 1
    failed = tmp_path / "spool" / "aggregated_events.failed.jsonl"
    assert len(failed.read_bytes().splitlines()) == 1


async def test_writer_service_runs_with_the_app(
    backend: str, store_factory: StoreFactory, tmp_path: Path
) -> None:
    store = store_factory(backend)
    writer = StoreWriter(store, spool_dir=tmp_path / "spool", flush_interval_ms=20)
    service = StoreWriterService(writer, stop_timeout_s=5.0)

    await service.start()
    writer.submit_detector(rows_of(make_events(10)))
    await service.stop()

    assert store.count_detector_events() == 10
    assert writer.backlog_rows == 0


# Durability before a commit.


def test_wait_durable_waits_only_for_rows_before_the_mark(
    backend: str,
    store_factory: StoreFactory,
    writer_factory: Callable[..., StoreWriter],
) -> None:
    store = store_factory(backend)
    # Rows would wait a minute for the interval: only the wait writes them.
    writer = writer_factory(store, flush_interval_ms=60_000, max_buffer_rows=1000)
    writer.start()
    writer.submit_detector(rows_of(make_events(30, prefix="before")))
    writer.submit_aggregated(aggregated_rows(make_events(5, prefix="before")))
    mark = writer.submitted_mark()
    writer.submit_detector(rows_of(make_events(20, prefix="after")))

    started_s = time.monotonic()
    assert writer.wait_durable(mark, timeout_s=10.0)

    assert time.monotonic() - started_s < 5.0
    assert writer.is_durable(mark)
    assert store.count_detector_events() >= 30
    assert store.count_aggregated_events() == 5
    assert writer.rows_submitted == 55
    assert writer.rows_durable >= 35


def test_rows_before_the_mark_are_spooled_when_the_store_is_down(
    backend: str,
    store_factory: StoreFactory,
    writer_factory: Callable[..., StoreWriter],
    tmp_path: Path,
) -> None:
    store = store_factory(backend)
    switch = SwitchableStore(_down_store())
    writer = writer_factory(switch, max_buffer_rows=1000)
    writer.start()
    writer.submit_detector(rows_of(make_events(40, prefix="before")))
    mark = writer.submitted_mark()

    assert not writer.wait_durable(mark, timeout_s=0.3)
    spooled = writer.spool_through(mark)
    writer.submit_detector(rows_of(make_events(10, prefix="after")))

    assert spooled == 40
    assert writer.is_durable(mark)
    assert not writer.is_durable(writer.submitted_mark())
    assert writer.rows_durable == 40 and writer.backlog_rows == 50
    spool_files = list((tmp_path / "spool").glob("detector_events*.jsonl"))
    lines = sum(len(path.read_bytes().splitlines()) for path in spool_files)
    assert lines == 40

    switch.target = store
    assert writer.flush(timeout_s=20.0)
    assert store.count_detector_events() == 50
    assert writer.rows_written == 50


# Reading a range back for a replay.


def test_replay_pages_lose_and_repeat_no_row_inside_one_millisecond(
    backend: str, store_factory: StoreFactory
) -> None:
    store = store_factory(backend)
    # 60 events on 3 cameras, 20 of them in one millisecond: page edges fall inside.
    events = make_events(40, step_ms=1000) + make_events(
        20, start_ms=NOW_MS - 1_800_000, step_ms=0, prefix="same-ms"
    )
    store.insert_detector_events(rows_of(events))
    since_ms, until_ms = NOW_MS - 2 * 3_600_000, NOW_MS

    pages = list(
        iter_rows(
            store,
            "detector_events",
            since_ms=since_ms,
            until_ms=until_ms,
            filters={},
            page_rows=7,
        )
    )
    camera_pages = list(
        iter_rows(
            store,
            "detector_events",
            since_ms=since_ms,
            until_ms=until_ms,
            filters={"camera_id": ["cam-1", "cam-2"], "outcome": ["kept"]},
            page_rows=5,
        )
    )

    ids = [row.event_id for page in pages for row in page]
    assert sorted(ids) == sorted(event.event_id for event in events)
    times = [row.event_time_ms for page in pages for row in page]
    assert times == sorted(times)
    wanted = [e.event_id for e in events if e.camera_id in ("cam-1", "cam-2")]
    assert sorted(row.event_id for page in camera_pages for row in page) == sorted(
        wanted
    )
    assert store.count_rows(
        "detector_events", since_ms=since_ms, until_ms=until_ms, filters={}
    ) == len(events)
    with pytest.raises(ValueError, match="cannot filter"):
        store.count_rows(
            "detector_events", since_ms=0, until_ms=1, filters={"payload": ["x"]}
        )
