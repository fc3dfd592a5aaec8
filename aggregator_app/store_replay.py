"""Replay stored events into a Kafka topic: ``aggregator-store-replay``.

Reads a time range of the event store (``--since``, ``--until``: ISO 8601 or
epoch s/ms/µs/ns; the range is half-open), optionally filtered, and sends the
rows in event-time order:

* ``--table detector`` (default): every accepted detector event, as unified
  schema JSON, keyed by camera id, to the rules file's ``unified`` source
  topic (with ``AGGREGATOR_TOPIC_PREFIX``): the pipeline processes them again,
  with the rules it runs now. Filters: ``--camera``, ``--site``,
  ``--detector``, ``--label``, ``--outcome`` (each may be repeated).
* ``--table aggregated``: the published events (open and closed), keyed by
  aggregated id, by default to the aggregated topic. Filters as above, plus
  ``--type`` and ``--status``; no ``--outcome``.

``--topic`` sends anywhere else. Every record carries its event time as
timestamp (an aggregated event: its start time) and the header
``x-aggregator-replay: 1``, so the ingest checks clock skew against the
record, not the wall clock, and windows follow event time as they did live.
``--speed F`` keeps the event-time gaps divided by F; ``--speed max`` sends
as fast as the broker takes them. A progress bar goes to stderr, one summary
line to stdout::

    store-replay: sent=3028 topic=detections.unified elapsed_s=0.8 rate_per_s=3785.0

The store is ``CLICKHOUSE_URL`` (or ``--store``); the embedded store can be
read only while no worker has it open (chdb holds one process per directory).

TODO: rows come in event-time order (ties by id), not in the order they first
arrived; where a camera's events arrived out of order, deduplication of the
replay may keep other events than the live run did. Storing the source
position with each row would allow the arrival order; the mark goes then.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from tqdm import tqdm

from aggregator_app.exceptions import AggregatorError, ConfigError
from aggregator_app.ingest import REPLAY_HEADER
from aggregator_app.settings import load_settings
from aggregator_app.store import (
    AggregatedEventRow,
    ClickHouseStore,
    DetectorEventRow,
    open_store,
)
from aggregator_app.timeparse import to_epoch_ms
from rules.config import load_rules

__all__ = [
    "ReplayStats",
    "StoredRecord",
    "iter_rows",
    "main",
    "replay_rows",
    "to_record",
]

logger = logging.getLogger(__name__)

DEFAULT_PAGE_ROWS = 10_000
_HEADERS = [(REPLAY_HEADER, b"1")]
_MAX_PENDING_SENDS = 10_000
_TABLES = {"detector": "detector_events", "aggregated": "aggregated_events"}

StoredRow = DetectorEventRow | AggregatedEventRow


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One Kafka record made from a stored row."""

    key: bytes
    timestamp_ms: int
    value: bytes


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """What a replay sent, and how fast."""

    sent: int
    elapsed_s: float


def iter_rows(
    store: ClickHouseStore,
    table: str,
    *,
    since_ms: int,
    until_ms: int,
    filters: Mapping[str, Sequence[str]],
    page_rows: int = DEFAULT_PAGE_ROWS,
) -> Iterator[list[StoredRow]]:
    """Yield the matching rows page by page, in ``(event_time_ms, key)`` order.

    Each page starts at the last page's last millisecond and skips the rows of
    that millisecond already yielded, so a page boundary inside one
    millisecond loses and repeats nothing. Blocking: call from a thread.
    """
    cursor_ms = since_ms
    seen_at_cursor: set[tuple[str, ...]] = set()
    while True:
        limit = page_rows + len(seen_at_cursor)
        rows: list[StoredRow] = list(
            store.fetch_rows(
                table,
                since_ms=cursor_ms,
                until_ms=until_ms,
                filters=filters,
                limit=limit,
            )
        )
        fresh = [
            row
            for row in rows
            if row.event_time_ms != cursor_ms or row.key() not in seen_at_cursor
        ]
        if fresh:
            yield fresh
        if len(rows) < limit:
            return

        last_ms = rows[-1].event_time_ms
        at_last = {row.key() for row in rows if row.event_time_ms == last_ms}
        seen_at_cursor = seen_at_cursor | at_last if last_ms == cursor_ms else at_last
        cursor_ms = last_ms


def to_record(row: StoredRow) -> StoredRecord:
    """Return the Kafka record of a stored row (see the module docstring)."""
    if isinstance(row, DetectorEventRow):
        key = row.camera_id
    else:
        key = row.aggregated_id
    return StoredRecord(
        key=key.encode(), timestamp_ms=row.event_time_ms, value=row.payload.encode()
    )


class _Pacer:
    """Holds each record until its event-time offset, divided by the speed, is due.

    A record older than one before it is due at once (the clock never goes back).
    """

    def __init__(self, speed: float | None) -> None:
        self.speed = speed
        self._start_s = time.monotonic()
        self._first_ms: int | None = None
        self._advanced_ms = 0

    async def wait_for(self, timestamp_ms: int) -> None:
        if self.speed is None:
            return
        if self._first_ms is None:
            self._first_ms = timestamp_ms
        self._advanced_ms = max(self._advanced_ms, timestamp_ms - self._first_ms)
        delay_s = self._start_s + self._advanced_ms / 1000 / self.speed
        delay_s -= time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)


async def replay_rows(
    pages: Iterator[list[StoredRow]],
    *,
    bootstrap: str,
    topic: str,
    speed: float | None,
    total: int | None = None,
    quiet: bool = False,
) -> ReplayStats:
    """Send the rows of ``pages`` to ``topic``, paced; wait until all are acked.

    Pages are read from the store in a thread, one ahead of the sends.

    Raises:
        KafkaError: the broker refused or could not be reached.
        StoreError: the store failed while reading.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=10,
        max_batch_size=512 * 1024,
        client_id="aggregator-store-replay",
    )
    await producer.start()
    try:
        return await _send_pages(
            producer, pages, topic=topic, speed=speed, total=total, quiet=quiet
        )
    finally:
        await producer.stop()


async def _send_pages(
    producer: AIOKafkaProducer,
    pages: Iterator[list[StoredRow]],
    *,
    topic: str,
    speed: float | None,
    total: int | None,
    quiet: bool,
) -> ReplayStats:
    pacer = _Pacer(speed)
    pending: list[asyncio.Future[Any]] = []
    sent = 0
    started_s = time.monotonic()
    next_page = asyncio.ensure_future(asyncio.to_thread(next, pages, None))

    with tqdm(total=total, unit="row", file=sys.stderr, disable=quiet) as bar:
        while (page := await next_page) is not None:
            next_page = asyncio.ensure_future(asyncio.to_thread(next, pages, None))
            for row in page:
                record = to_record(row)
                await pacer.wait_for(record.timestamp_ms)
                pending.append(await _send(producer, topic, record))
                sent += 1
                bar.update()
                if len(pending) >= _MAX_PENDING_SENDS:
                    await _settle(pending)
        await _settle(pending)

    return ReplayStats(sent=sent, elapsed_s=time.monotonic() - started_s)


async def _send(
    producer: AIOKafkaProducer, topic: str, record: StoredRecord
) -> asyncio.Future[Any]:
    return await producer.send(
        topic,
        value=record.value,
        key=record.key,
        timestamp_ms=record.timestamp_ms,
        headers=_HEADERS,
    )


async def _settle(pending: list[asyncio.Future[Any]]) -> None:
    await asyncio.gather(*pending)
    pending.clear()


# -- command line -------------------------------------------------------------


def _time_ms(text: str) -> int:
    value: object = int(text) if text.isdigit() else text
    try:
        return to_epoch_ms(value, naive="utc")
    except (AggregatorError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from exc


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    factor = float(text)
    if factor < 0:
        raise argparse.ArgumentTypeError("speed must be >= 0 or 'max'")
    return factor or None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregator-store-replay",
        description="Replay a time range of the event store into a Kafka topic.",
    )
    parser.add_argument("--since", type=_time_ms, required=True, help="range start")
    parser.add_argument("--until", type=_time_ms, required=True, help="range end")
    parser.add_argument("--table", choices=sorted(_TABLES), default="detector")
    parser.add_argument("--topic", help="default: see the module docstring")
    parser.add_argument("--store", help="store URL; default: $CLICKHOUSE_URL")
    parser.add_argument("--bootstrap", help="default: $KAFKA_BOOTSTRAP")
    parser.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        metavar="FACTOR",
        help="real speed times FACTOR; 0 or 'max': as fast as possible (default 1)",
    )
    for flag, help_text in _FILTER_FLAGS.items():
        parser.add_argument(
            f"--{flag}", action="append", default=[], metavar="VALUE", help=help_text
        )
    parser.add_argument("--page-rows", type=int, default=DEFAULT_PAGE_ROWS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


#: Filter flags and the column each one filters.
_FILTER_FLAGS = {
    "camera": "camera id",
    "site": "site id",
    "zone": "zone id",
    "detector": "detector kind (person, face, vehicle, ...)",
    "label": "label",
    "type": "aggregated event type (aggregated table only)",
    "status": "open or closed (aggregated table only)",
    "outcome": "kept, repeat or redelivery (detector table only)",
}
_FILTER_COLUMNS = {
    "camera": "camera_id",
    "site": "site_id",
    "zone": "zone_id",
    "detector": "detector",
    "label": "label",
    "type": "type",
    "status": "status",
    "outcome": "outcome",
}


def _filters(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        column: getattr(args, flag)
        for flag, column in _FILTER_COLUMNS.items()
        if getattr(args, flag)
    }


def _default_topic(table: str) -> str:
    settings = load_settings()
    rules = load_rules(settings.rules_path).with_topic_prefix(settings.topic_prefix)
    if table == "aggregated":
        return rules.aggregated_topic
    for source in rules.sources:
        if source.adapter == "unified":
            return source.topic
    raise ConfigError(f"no source of adapter 'unified' in {settings.rules_path}")


def _open(url: str | None) -> ClickHouseStore:
    settings = load_settings()
    store = open_store(
        url or settings.clickhouse_url, default_dir=settings.data_dir / "chdb"
    )
    if not isinstance(store, ClickHouseStore):
        raise ConfigError(f"cannot replay from this store: {store!r}")
    return store


async def _run(args: argparse.Namespace) -> tuple[ReplayStats, str]:
    table = _TABLES[args.table]
    topic = args.topic or _default_topic(args.table)
    bootstrap = args.bootstrap or load_settings().kafka_bootstrap
    filters = _filters(args)
    store = _open(args.store)
    try:
        total = await asyncio.to_thread(
            store.count_rows,
            table,
            since_ms=args.since,
            until_ms=args.until,
            filters=filters,
        )
        logger.info(
            "store-replay: starting: table=%s rows=%d topic=%s filters=%s",
            table,
            total,
            topic,
            filters,
        )
        pages = iter_rows(
            store,
            table,
            since_ms=args.since,
            until_ms=args.until,
            filters=filters,
            page_rows=args.page_rows,
        )
        stats = await replay_rows(
            pages,
            bootstrap=bootstrap,
            topic=topic,
            speed=args.speed,
            total=total,
            quiet=args.quiet,
        )
    finally:
        store.close()
    return stats, topic


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        stats, topic = asyncio.run(_run(args))
    except (AggregatorError, OSError, ValueError) as exc:
        logger.error("store-replay: failed: error=%s", exc)
        return 1
    except KafkaError as exc:
        logger.error("store-replay: kafka failed: error=%r", exc)
        return 1

    rate_per_s = stats.sent / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    print(
        f"store-replay: sent={stats.sent} topic={topic} "
        f"elapsed_s={stats.elapsed_s:.3f} rate_per_s={rate_per_s:.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
