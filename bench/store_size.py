"""Measure the event store's bytes per row on real data, and the disk a day takes.

Usage::

    .venv/bin/python bench/store_size.py [--copies 80] [--server clickhouse://127.0.0.1:9000]
        [--skip-server] [--skip-chdb] [--events-per-s 10000] [--retention-days 30]

Steps:

1. Read NVIDIA's garage recording (3028 DeepStream messages), turn it into
   events with the service's own ingest, deduplicate it with its own
   deduplicator, and make the ``open`` and ``closed`` observations it would
   publish.
2. Replicate it ``--copies`` times into a realistic volume: every copy gets
   new event ids (random UUIDs, as DeepStream's), new tracker ids, its own
   time range after the previous copy, and positions and boxes moved by a
   little noise, so that no copy compresses against another.
3. Write both tables on each backend (a fresh database on the ClickHouse
   server, and embedded chdb in a temp dir), merge each table into as few
   parts as possible (``OPTIMIZE ... FINAL``), and read the sizes from
   ``system.parts``, and per column from ``system.columns``.
4. Print bytes per row (on disk, compressed data, uncompressed), and the disk
   one day at ``--events-per-s`` takes, and the retention window.
5. Where the server has column codecs (not 18.16), recompress every
   ``String`` column with ``ZSTD(3)`` and print the same again: what the
   schema would save with codecs on a current server.

Inserts use the backends' raw insert (no check for stored keys): this measures
size, not the writer.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from aggregator_app.dedup import Deduplicator, MemorySpanStore  # noqa: E402
from aggregator_app.ingest import RawRecord, parse_record  # noqa: E402
from aggregator_app.schema import (  # noqa: E402
    AggregatedEvent,
    BBox,
    DetectorEvent,
    GroundPoint,
)
from aggregator_app.store import (  # noqa: E402
    ClickHouseStore,
    EmbeddedStore,
    aggregated_event_row,
    detector_event_row,
    open_store,
)
from aggregator_app.store.base import Outcome  # noqa: E402
from aggregator_app.store.schema import (  # noqa: E402
    AGGREGATED_EVENTS,
    DETECTOR_EVENTS,
    TableSpec,
    supports_ttl,
)
from aggregator_app.timeparse import to_epoch_ms  # noqa: E402
from rules.config import load_rules  # noqa: E402

GARAGE_FILE = REPO_ROOT / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl"
RULES = load_rules(REPO_ROOT / "config/aggregation-rules.yml")
DEEPSTREAM = next(source for source in RULES.sources if source.adapter == "deepstream")
INSERT_BATCH_ROWS = 20_000
DAY_S = 86_400


@dataclass(frozen=True)
class Decided:
    """One accepted event with its dedup outcome."""

    event: DetectorEvent
    outcome: str
    kept_id: str


@dataclass(frozen=True)
class TableSize:
    """What ``system.parts`` says of one table."""

    rows: int
    parts: int
    on_disk_bytes: int
    compressed_bytes: int
    uncompressed_bytes: int

    def per_row(self, value: int) -> float:
        return value / self.rows if self.rows else 0.0


# Step 1.


def garage_events() -> tuple[list[Decided], list[AggregatedEvent]]:
    """Return the garage events with their outcomes, and the observations."""
    lines = [line for line in GARAGE_FILE.read_bytes().splitlines() if line.strip()]
    deduplicator = Deduplicator(RULES.dedup, MemorySpanStore())
    decided: list[Decided] = []
    kept: dict[str, tuple[DetectorEvent, object]] = {}
    for offset, payload in enumerate(lines):
        message = orjson.loads(payload)
        record = RawRecord(
            value=payload,
            key=message["sensor"]["id"].encode(),
            topic=DEEPSTREAM.topic,
            partition=0,
            offset=offset,
            timestamp_ms=to_epoch_ms(message["@timestamp"], naive="utc"),
            replayed=True,
        )
        for event in parse_record(record, source=DEEPSTREAM, rules=RULES, now_ms=0):
            decision = deduplicator.observe(event, 0)
            outcome = "kept" if decision.outcome == "kept" else decision.outcome
            decided.append(Decided(event, outcome, decision.span.kept_id))
            if decision.outcome == "kept":
                kept[event.event_id] = (event, decision.span)
    return decided, _observations(kept)


def _observations(
    kept: dict[str, tuple[DetectorEvent, object]],
) -> list[AggregatedEvent]:
    published = []
    for event, span in kept.values():
        for status in ("open", "closed"):
            is_open = status == "open"
            published.append(
                AggregatedEvent(
                    aggregated_id=f"{RULES.dedup.rule_id}:{event.event_id}",
                    type="observation",
                    status=status,  # type: ignore[arg-type]
                    rule_id=RULES.dedup.rule_id,
                    camera_id=event.camera_id,
                    site_id=event.site_id,
                    detector=event.detector,
                    label=event.label,
                    start_time_ms=span.start_ms,  # type: ignore[attr-defined]
                    end_time_ms=span.start_ms if is_open else span.last_ms,  # type: ignore[attr-defined]
                    absorbed_count=0 if is_open else span.absorbed_count,  # type: ignore[attr-defined]
                    absorbed_ids=[] if is_open else list(span.absorbed_ids),  # type: ignore[attr-defined]
                    event=event,
                )
            )
    return published


# Step 2.


class Replicator:
    """Makes copy ``k`` of an event: new ids, later times, a little noise."""

    def __init__(self, decided: list[Decided], *, seed: int = 7) -> None:
        times = [item.event.event_time_ms for item in decided]
        self.span_ms = max(times) - min(times) + 1000
        self.rng = random.Random(seed)
        self.ids: dict[tuple[int, str], str] = {}

    def new_id(self, copy: int, event_id: str) -> str:
        key = (copy, event_id)
        if key not in self.ids:
            self.ids[key] = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        return self.ids[key]

    def event(self, copy: int, event: DetectorEvent) -> DetectorEvent:
        if copy == 0:
            return event
        update: dict[str, object] = {
            "event_id": self.new_id(copy, event.event_id),
            "event_time_ms": event.event_time_ms + copy * self.span_ms,
        }
        if event.tracker_id is not None:
            update["tracker_id"] = f"{event.tracker_id}-{copy}"
        if event.position is not None:
            update["position"] = GroundPoint(
                x_m=event.position.x_m + self.rng.uniform(-0.5, 0.5),
                y_m=event.position.y_m + self.rng.uniform(-0.5, 0.5),
                z_m=event.position.z_m,
            )
        if event.bbox_px is not None:
            shift = self.rng.uniform(-3, 3)
            box = event.bbox_px
            update["bbox_px"] = BBox(
                x_min=box.x_min + shift,
                y_min=box.y_min + shift,
                x_max=box.x_max + shift,
                y_max=box.y_max + shift,
            )
        return event.model_copy(update=update)

    def observation(self, copy: int, item: AggregatedEvent) -> AggregatedEvent:
        if copy == 0:
            return item
        event = self.event(copy, item.event)
        shift_ms = copy * self.span_ms
        return item.model_copy(
            update={
                "aggregated_id": f"{RULES.dedup.rule_id}:{event.event_id}",
                "start_time_ms": item.start_time_ms + shift_ms,
                "end_time_ms": item.end_time_ms + shift_ms,
                "absorbed_ids": [self.new_id(copy, i) for i in item.absorbed_ids],
                "event": event,
            }
        )


def detector_batches(
    decided: list[Decided], replicator: Replicator, copies: int
) -> Iterator[list[tuple[object, ...]]]:
    batch: list[tuple[object, ...]] = []
    now_ms = int(time.time() * 1000)
    for copy in range(copies):
        for item in decided:
            event = replicator.event(copy, item.event)
            outcome = Outcome(item.outcome if item.outcome != "reprocessed" else "kept")
            kept_id = (
                None
                if outcome is Outcome.KEPT
                else replicator.new_id(copy, item.kept_id)
            )
            if copy == 0 and kept_id is not None:
                kept_id = item.kept_id
            row = detector_event_row(
                event, outcome=outcome, kept_event_id=kept_id, inserted_at_ms=now_ms
            )
            batch.append(row.record())
            if len(batch) >= INSERT_BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def aggregated_batches(
    published: list[AggregatedEvent], replicator: Replicator, copies: int
) -> Iterator[list[tuple[object, ...]]]:
    batch: list[tuple[object, ...]] = []
    now_ms = int(time.time() * 1000)
    for copy in range(copies):
        for item in published:
            row = aggregated_event_row(
                replicator.observation(copy, item), inserted_at_ms=now_ms
            )
            batch.append(row.record())
            if len(batch) >= INSERT_BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


# Step 3.


def fill(
    store: ClickHouseStore,
    spec: TableSpec,
    batches: Iterator[list[tuple[object, ...]]],
) -> None:
    for batch in batches:
        store._insert(spec, batch)  # the raw INSERT: see the module docstring
    store._execute(f"OPTIMIZE TABLE {store._table(spec)} FINAL")


def table_size(store: ClickHouseStore, spec: TableSpec) -> TableSize:
    [row] = store._select(
        "SELECT sum(rows), count(), sum(bytes_on_disk), sum(data_compressed_bytes), "
        "sum(data_uncompressed_bytes) FROM system.parts "
        f"WHERE active AND database = '{store.database}' AND table = '{spec.name}'"
    )
    return TableSize(*(int(value) for value in row))


def column_sizes(store: ClickHouseStore, spec: TableSpec) -> list[tuple[str, int]]:
    rows = store._select(
        "SELECT name, data_compressed_bytes FROM system.columns "
        f"WHERE database = '{store.database}' AND table = '{spec.name}' "
        "ORDER BY data_compressed_bytes DESC LIMIT 4"
    )
    return [(str(name), int(size)) for name, size in rows]


def recompress(store: ClickHouseStore) -> None:
    """Give every ``String`` column ``CODEC(ZSTD(3))`` and rewrite the parts."""
    for spec in (DETECTOR_EVENTS, AGGREGATED_EVENTS):
        for column, kind in spec.columns:
            if kind == "String":
                store._execute(
                    f"ALTER TABLE {store._table(spec)} MODIFY COLUMN {column} "
                    "String CODEC(ZSTD(3))"
                )
        store._execute(f"OPTIMIZE TABLE {store._table(spec)} FINAL")


# Step 4.


def report(
    name: str,
    store: ClickHouseStore,
    *,
    events_per_s: int,
    retention_days: int,
    aggregated_per_event: float,
) -> None:
    version = store._select("SELECT version()")[0][0]
    print(f"\n== {name} (ClickHouse {version}) ==")
    per_row_on_disk = {}
    for spec in (DETECTOR_EVENTS, AGGREGATED_EVENTS):
        size = table_size(store, spec)
        per_row_on_disk[spec.name] = size.per_row(size.on_disk_bytes)
        columns = ", ".join(
            f"{column}={bytes_ / size.rows:.1f}"
            for column, bytes_ in column_sizes(store, spec)
        )
        print(
            f"{spec.name}: rows={size.rows} parts={size.parts} "
            f"on_disk_bytes_per_row={size.per_row(size.on_disk_bytes):.1f} "
            f"compressed_bytes_per_row={size.per_row(size.compressed_bytes):.1f} "
            f"uncompressed_bytes_per_row={size.per_row(size.uncompressed_bytes):.1f} "
            f"ratio={size.uncompressed_bytes / max(1, size.compressed_bytes):.1f}"
        )
        print(f"  largest columns (compressed bytes per row): {columns}")

    rows_per_day = events_per_s * DAY_S
    per_event = (
        per_row_on_disk[DETECTOR_EVENTS.name]
        + aggregated_per_event * per_row_on_disk[AGGREGATED_EVENTS.name]
    )
    day_gb = rows_per_day * per_event / 1e9
    # Whole days are dropped: up to one day more than the retention is held.
    held_days = retention_days + 1
    print(
        f"budget: events_per_s={events_per_s} detector_rows_per_day={rows_per_day} "
        f"aggregated_rows_per_event={aggregated_per_event:.3f} "
        f"bytes_per_event={per_event:.1f} disk_per_day_gb={day_gb:.1f} "
        f"disk_for_{held_days}_days_gb={day_gb * held_days:.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=80)
    parser.add_argument("--server", default="clickhouse://127.0.0.1:9000")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-chdb", action="store_true")
    parser.add_argument("--events-per-s", type=int, default=10_000)
    parser.add_argument("--retention-days", type=int, default=30)
    args = parser.parse_args(argv)

    decided, published = garage_events()
    aggregated_per_event = len(published) / len(decided)
    print(
        f"garage: events={len(decided)} observations={len(published)} "
        f"copies={args.copies} detector_rows={len(decided) * args.copies}"
    )

    database = f"bench_size_{uuid.uuid4().hex[:8]}"
    targets: list[tuple[str, ClickHouseStore]] = []
    if not args.skip_server:
        server = open_store(f"{args.server.rstrip('/')}/{database}")
        assert isinstance(server, ClickHouseStore)
        targets.append(("server", server))
    tmp = tempfile.TemporaryDirectory(prefix="bench-chdb-")
    if not args.skip_chdb:
        targets.append(("chdb", EmbeddedStore(Path(tmp.name), database=database)))

    for name, store in targets:
        try:
            started_s = time.monotonic()
            store.ensure_schema()
            replicator = Replicator(decided)
            fill(
                store,
                DETECTOR_EVENTS,
                detector_batches(decided, replicator, args.copies),
            )
            fill(
                store,
                AGGREGATED_EVENTS,
                aggregated_batches(published, replicator, args.copies),
            )
            print(f"\n{name}: filled in {time.monotonic() - started_s:.1f} s")
            report(
                name,
                store,
                events_per_s=args.events_per_s,
                retention_days=args.retention_days,
                aggregated_per_event=aggregated_per_event,
            )
            if supports_ttl(str(store._select("SELECT version()")[0][0])):
                recompress(store)
                report(
                    f"{name}, String columns with ZSTD(3)",
                    store,
                    events_per_s=args.events_per_s,
                    retention_days=args.retention_days,
                    aggregated_per_event=aggregated_per_event,
                )
        finally:
            store._execute(f"DROP DATABASE IF EXISTS `{database}`")
            store.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
