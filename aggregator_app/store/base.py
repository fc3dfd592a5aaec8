"""The event store contract, the rows it stores, and the SQL both backends share.

:class:`EventStore` is what the rest of the service sees. :class:`ClickHouseStore`
implements it once in SQL that runs on ClickHouse 18.16 and on a current
ClickHouse; a backend (``native``, ``embedded``) only supplies three primitives
(run a statement, run a query, insert records), ``close`` and the mapping of its
driver's errors to :class:`~aggregator_app.exceptions.StoreError`.

Every method is synchronous and may block on the network or the disk: call it
from a thread (``StoreWriter`` does), never on the event loop.
"""

from __future__ import annotations

import abc
import enum
import logging
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aggregator_app.exceptions import StoreError, StoreUnavailable
from aggregator_app.schema import (
    ActionEvent,
    AggregatedEvent,
    CorrelatedEvent,
    DetectorEvent,
    EpisodeEvent,
)
from aggregator_app.store.schema import (
    AGGREGATED_EVENTS,
    DETECTOR_EVENTS,
    TableSpec,
    create_database_sql,
    create_table_sql,
    quote_identifier,
    sql_string,
    supports_ttl,
)

__all__ = [
    "DEFAULT_DATABASE",
    "FILTER_COLUMNS",
    "DEFAULT_TTL_DAYS",
    "AggregatedEventRow",
    "correlated_event_row",
    "ClickHouseStore",
    "DetectorEventRow",
    "EventStore",
    "Outcome",
    "action_event_row",
    "aggregated_event_row",
    "episode_event_row",
    "detector_event_row",
    "store_error_for_code",
]

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "aggregator"
DEFAULT_TTL_DAYS = 30
DEFAULT_FETCH_LIMIT = 10_000

_DAY_MS = 86_400_000
# Keys per ``IN (...)`` list: keeps a query far below max_query_size (256 KiB).
_KEYS_PER_QUERY = 1000

# ClickHouse error codes that say "not now" rather than "never": a retry may pass.
_RETRIABLE_CODES = frozenset(
    {
        159,  # TIMEOUT_EXCEEDED
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        252,  # TOO_MANY_PARTS
        279,  # ALL_CONNECTION_TRIES_FAILED
        319,  # UNKNOWN_STATUS_OF_INSERT
    }
)


class Outcome(enum.StrEnum):
    """What deduplication decided about one accepted detector event."""

    KEPT = "kept"
    REPEAT = "repeat"
    REDELIVERY = "redelivery"


@dataclass(frozen=True, slots=True)
class DetectorEventRow:
    """One row of ``detector_events``: an accepted event and its dedup outcome.

    Fields are the table's columns in order. ``outcome`` is an :class:`Outcome`
    value, kept as a plain ``str`` (the driver writes enum members by name).
    Optional ids are ``""`` when absent; ``payload`` is the event as JSON, the
    source of truth for :meth:`to_event`. ``version`` is when the row was made
    (epoch ms), the ``ReplacingMergeTree`` version.
    """

    event_id: str
    outcome: str
    kept_event_id: str
    source: str
    detector: str
    camera_id: str
    site_id: str
    zone_id: str
    label: str
    confidence: float | None
    event_time_ms: int
    tracker_id: str
    position_x_m: float | None
    position_y_m: float | None
    payload: str
    version: int

    @classmethod
    def from_record(cls, record: Sequence[Any]) -> DetectorEventRow:
        """Build a row from column values as a driver returns them."""
        return cls(*record)

    def key(self) -> tuple[str, ...]:
        """Return what identifies this row in its table."""
        return (self.event_id,)

    def record(self) -> tuple[Any, ...]:
        """Return the column values in table order."""
        return _detector_record(self)

    def to_event(self) -> DetectorEvent:
        """Return the stored event, parsed from ``payload``."""
        return DetectorEvent.model_validate_json(self.payload)


@dataclass(frozen=True, slots=True)
class AggregatedEventRow:
    """One row of ``aggregated_events``: one published version of an event.

    Its key is ``(aggregated_id, status)``; ``event_time_ms`` is the start time,
    so the open and the closed row of one event land in the same partition.
    """

    aggregated_id: str
    status: str
    type: str
    rule_id: str
    event_id: str
    detector: str
    camera_id: str
    site_id: str
    zone_id: str
    label: str
    confidence: float | None
    event_time_ms: int
    end_time_ms: int
    absorbed_count: int
    tracker_id: str
    position_x_m: float | None
    position_y_m: float | None
    payload: str
    version: int

    @classmethod
    def from_record(cls, record: Sequence[Any]) -> AggregatedEventRow:
        """Build a row from column values as a driver returns them."""
        return cls(*record)

    def key(self) -> tuple[str, ...]:
        """Return what identifies this row in its table."""
        return (self.aggregated_id, self.status)

    def record(self) -> tuple[Any, ...]:
        """Return the column values in table order."""
        return _aggregated_record(self)

    def to_event(self) -> AggregatedEvent:
        """Return the stored event, parsed from ``payload``."""
        return AggregatedEvent.model_validate_json(self.payload)


_detector_record = operator.attrgetter(*DETECTOR_EVENTS.column_names)
_aggregated_record = operator.attrgetter(*AGGREGATED_EVENTS.column_names)


def detector_event_row(
    event: DetectorEvent,
    *,
    outcome: Outcome = Outcome.KEPT,
    kept_event_id: str | None = None,
    inserted_at_ms: int,
) -> DetectorEventRow:
    """Return the ``detector_events`` row of one accepted event.

    Args:
        event: the event as ingested.
        outcome: what deduplication decided.
        kept_event_id: the event this one was folded into; defaults to the
            event itself, and is required unless ``outcome`` is ``kept``.
        inserted_at_ms: when the row is made (epoch ms), its version.

    Raises:
        ValueError: ``kept_event_id`` does not fit ``outcome``.
    """
    outcome = Outcome(outcome)
    kept_id = _kept_event_id(event.event_id, outcome, kept_event_id)
    position = event.position

    return DetectorEventRow(
        event_id=event.event_id,
        outcome=outcome.value,
        kept_event_id=kept_id,
        source=event.source,
        detector=str(event.detector),
        camera_id=event.camera_id,
        site_id=event.site_id or "",
        zone_id=event.zone_id or "",
        label=event.label,
        confidence=event.confidence,
        event_time_ms=event.event_time_ms,
        tracker_id=event.tracker_id or "",
        position_x_m=None if position is None else position.x_m,
        position_y_m=None if position is None else position.y_m,
        payload=event.json_text,
        version=inserted_at_ms,
    )


def aggregated_event_row(
    event: AggregatedEvent, *, inserted_at_ms: int
) -> AggregatedEventRow:
    """Return the ``aggregated_events`` row of one published event.

    Args:
        event: the event as published.
        inserted_at_ms: when the row is made (epoch ms), its version.
    """
    inner = event.event
    position = inner.position

    return AggregatedEventRow(
        aggregated_id=event.aggregated_id,
        status=event.status,
        type=event.type,
        rule_id=event.rule_id,
        event_id=inner.event_id,
        detector=str(event.detector),
        camera_id=event.camera_id,
        site_id=event.site_id or "",
        zone_id=inner.zone_id or "",
        label=event.label,
        confidence=inner.confidence,
        event_time_ms=event.start_time_ms,
        end_time_ms=event.end_time_ms,
        absorbed_count=event.absorbed_count,
        tracker_id=inner.tracker_id or "",
        position_x_m=None if position is None else position.x_m,
        position_y_m=None if position is None else position.y_m,
        payload=event.json_text,
        version=inserted_at_ms,
    )


def correlated_event_row(
    event: CorrelatedEvent, *, inserted_at_ms: int
) -> AggregatedEventRow:
    """Return the ``aggregated_events`` row of a published ``correlated`` event.

    The table's columns fit: ``event_id`` holds the global id, ``camera_id``
    the first camera, the times are first and last seen, ``absorbed_count`` is
    the member count; the whole event is in ``payload``. No new table is
    needed, on ClickHouse 18.16 or chdb.
    """
    position = event.last_position
    return AggregatedEventRow(
        aggregated_id=event.aggregated_id,
        status=event.status,
        type=event.type,
        rule_id=event.rule_id,
        event_id=event.global_id,
        detector="",
        camera_id=event.cameras[0] if event.cameras else "",
        site_id=event.site_id,
        zone_id="",
        label="",
        confidence=None,
        event_time_ms=event.first_seen_ms,
        end_time_ms=event.last_seen_ms,
        absorbed_count=event.member_count,
        tracker_id="",
        position_x_m=None if position is None else position.x_m,
        position_y_m=None if position is None else position.y_m,
        payload=event.json_text,
        version=inserted_at_ms,
    )


def action_event_row(event: ActionEvent, *, inserted_at_ms: int) -> AggregatedEventRow:
    """Return the ``aggregated_events`` row of an action (``type = 'action'``).

    Actions are final, so their status is ``closed``; the row's event fields
    are the first member's, ``label`` is the action's name, ``absorbed_count``
    the number of members; ``payload`` is the whole :class:`ActionEvent`.
    """
    first = event.members[0]
    return AggregatedEventRow(
        aggregated_id=event.aggregated_id,
        status=event.status,
        type=event.type,
        rule_id=event.rule_id,
        event_id=first.event_id,
        detector=str(first.detector),
        camera_id=event.camera_id,
        site_id=event.site_id or "",
        zone_id=first.zone_id or "",
        label=event.action,
        confidence=None,
        event_time_ms=event.start_time_ms,
        end_time_ms=event.end_time_ms,
        absorbed_count=len(event.members),
        tracker_id=first.tracker_id or "",
        position_x_m=None,
        position_y_m=None,
        payload=event.json_text,
        version=inserted_at_ms,
    )


def episode_event_row(
    event: EpisodeEvent, *, inserted_at_ms: int
) -> AggregatedEventRow:
    """Return the ``aggregated_events`` row of an episode (``type = 'episode'``).

    ``camera_id`` is the first camera visited, ``event_id`` and
    ``tracker_id`` the global id, ``absorbed_count`` the observations,
    ``position`` the path's last point; ``payload`` is the whole episode.
    """
    last = event.path[-1] if event.path else None
    return AggregatedEventRow(
        aggregated_id=event.aggregated_id,
        status=event.status,
        type=event.type,
        rule_id="episodes",
        event_id=event.global_id,
        detector="",
        camera_id=event.cameras[0],
        site_id=event.site_id or "",
        zone_id="",
        label="episode",
        confidence=event.best_confidence,
        event_time_ms=event.start_time_ms,
        end_time_ms=event.end_time_ms,
        absorbed_count=event.observation_count,
        tracker_id=event.global_id,
        position_x_m=None if last is None else last.x_m,
        position_y_m=None if last is None else last.y_m,
        payload=event.json_text,
        version=inserted_at_ms,
    )


def store_error_for_code(code: int | None, message: str) -> StoreError:
    """Return our error for a ClickHouse error code: retriable ones are unavailable."""
    if code in _RETRIABLE_CODES:
        return StoreUnavailable(message)
    return StoreError(message)


def _kept_event_id(event_id: str, outcome: Outcome, kept_event_id: str | None) -> str:
    if outcome is Outcome.KEPT:
        if kept_event_id not in (None, event_id):
            raise ValueError(
                f"a kept event is its own kept event: event_id={event_id!r} "
                f"kept_event_id={kept_event_id!r}"
            )
        return event_id

    if not kept_event_id:
        raise ValueError(f"outcome {outcome} needs the kept event id: {event_id!r}")
    return kept_event_id


class EventStore(abc.ABC):
    """Where detector events and aggregated events are kept for queries and replay.

    Inserts are idempotent: a batch written again (after a timeout, a crash, a
    replayed spool) adds only the rows the store does not hold yet. Times are
    UTC epoch milliseconds; a range ``since_ms, until_ms`` is half-open.
    """

    @abc.abstractmethod
    def ensure_schema(self) -> None:
        """Create the database and the tables if they are missing."""

    @abc.abstractmethod
    def insert_detector_events(self, rows: Sequence[DetectorEventRow]) -> int:
        """Insert the rows not stored yet; return how many were inserted."""

    @abc.abstractmethod
    def insert_aggregated_events(self, rows: Sequence[AggregatedEventRow]) -> int:
        """Insert the rows not stored yet; return how many were inserted."""

    @abc.abstractmethod
    def count_detector_events(
        self,
        *,
        since_ms: int | None = None,
        until_ms: int | None = None,
        camera_id: str | None = None,
        outcome: Outcome | None = None,
    ) -> int:
        """Return how many detector events match every filter given."""

    @abc.abstractmethod
    def count_aggregated_events(
        self,
        *,
        since_ms: int | None = None,
        until_ms: int | None = None,
        camera_id: str | None = None,
        status: str | None = None,
    ) -> int:
        """Return how many aggregated event rows match every filter given."""

    @abc.abstractmethod
    def fetch_detector_events(
        self,
        since_ms: int,
        until_ms: int,
        camera_id: str | None = None,
        limit: int = DEFAULT_FETCH_LIMIT,
    ) -> list[DetectorEventRow]:
        """Return detector events in ``[since_ms, until_ms)`` by event time."""

    @abc.abstractmethod
    def fetch_aggregated(
        self, since_ms: int, until_ms: int, limit: int = DEFAULT_FETCH_LIMIT
    ) -> list[AggregatedEventRow]:
        """Return aggregated event rows starting in ``[since_ms, until_ms)``."""

    @abc.abstractmethod
    def drop_partitions_older_than(
        self, days: int, *, now_ms: int | None = None
    ) -> int:
        """Drop every day whose rows were all stored over ``days`` days ago.

        Returns how many partitions were dropped; ``now_ms`` defaults to now.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the store is not used afterwards."""


class _StoredRow(Protocol):
    @property
    def event_time_ms(self) -> int: ...

    def key(self) -> tuple[str, ...]: ...

    def record(self) -> tuple[Any, ...]: ...


_Row = TypeVar("_Row", bound=_StoredRow)


class ClickHouseStore(EventStore):
    """:class:`EventStore` in ClickHouse SQL; a backend adds the connection.

    A backend implements ``_execute``, ``_select``, ``_insert`` and ``close``,
    and raises only :class:`~aggregator_app.exceptions.StoreError` from them.

    Inserts are exact (each key stored once, counted at once) as long as one
    writer at a time inserts a given key, and a retry starts after the attempt
    it repeats has ended on the server. Two writers racing on one new key, or a
    retry overtaking an INSERT the server is still running after the client
    timed out, can store a key twice; ``ReplacingMergeTree(version)`` collapses
    such a pair at its next merge. Counts and fetches read the rows as stored
    (no ``FINAL``), so they would show such a pair until then.
    """

    def __init__(self, *, database: str, ttl_days: int | None) -> None:
        quote_identifier(database)
        self.database = database
        self.ttl_days = ttl_days

    @abc.abstractmethod
    def _execute(self, sql: str) -> None:
        """Run a statement that returns nothing."""

    @abc.abstractmethod
    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a query; return its rows as tuples of Python values."""

    @abc.abstractmethod
    def _insert(self, spec: TableSpec, records: list[tuple[Any, ...]]) -> None:
        """Insert records (values in ``spec.column_names`` order) in one INSERT."""

    def ensure_schema(self) -> None:
        """Create the database and both tables if they are missing.

        A server with table TTL also gets ``TTL inserted_at + INTERVAL
        <ttl_days> DAY`` on both tables.
        """
        version = str(self._select("SELECT version()")[0][0])
        ttl_days = self.ttl_days if supports_ttl(version) else None

        self._execute(create_database_sql(self.database))
        for spec in (DETECTOR_EVENTS, AGGREGATED_EVENTS):
            self._execute(create_table_sql(self.database, spec, ttl_days=ttl_days))

        logger.info(
            "store schema ready: database=%s server_version=%s ttl_days=%s",
            self.database,
            version,
            ttl_days,
        )

    def insert_detector_events(self, rows: Sequence[DetectorEventRow]) -> int:
        """Insert the rows not stored yet; return how many were inserted."""
        return self._insert_new(DETECTOR_EVENTS, rows)

    def insert_aggregated_events(self, rows: Sequence[AggregatedEventRow]) -> int:
        """Insert the rows not stored yet; return how many were inserted."""
        return self._insert_new(AGGREGATED_EVENTS, rows)

    def count_detector_events(
        self,
        *,
        since_ms: int | None = None,
        until_ms: int | None = None,
        camera_id: str | None = None,
        outcome: Outcome | None = None,
    ) -> int:
        """Return how many detector events match every filter given."""
        where = _where(
            since_ms=since_ms,
            until_ms=until_ms,
            equal={"camera_id": camera_id, "outcome": outcome},
        )
        return self._count(DETECTOR_EVENTS, where)

    def count_aggregated_events(
        self,
        *,
        since_ms: int | None = None,
        until_ms: int | None = None,
        camera_id: str | None = None,
        status: str | None = None,
    ) -> int:
        """Return how many aggregated event rows match every filter given."""
        where = _where(
            since_ms=since_ms,
            until_ms=until_ms,
            equal={"camera_id": camera_id, "status": status},
        )
        return self._count(AGGREGATED_EVENTS, where)

    def fetch_detector_events(
        self,
        since_ms: int,
        until_ms: int,
        camera_id: str | None = None,
        limit: int = DEFAULT_FETCH_LIMIT,
    ) -> list[DetectorEventRow]:
        """Return detector events in ``[since_ms, until_ms)``.

        Rows come in ``(event_time_ms, event_id)`` order. To page through more
        than ``limit`` rows, ask again from the last row's ``event_time_ms`` and
        skip the ids already seen at that millisecond.
        """
        where = _where(
            since_ms=since_ms, until_ms=until_ms, equal={"camera_id": camera_id}
        )
        records = self._fetch(DETECTOR_EVENTS, where, limit=limit)
        return [DetectorEventRow.from_record(record) for record in records]

    def fetch_aggregated(
        self, since_ms: int, until_ms: int, limit: int = DEFAULT_FETCH_LIMIT
    ) -> list[AggregatedEventRow]:
        """Return aggregated event rows starting in ``[since_ms, until_ms)``.

        Rows come in ``(event_time_ms, aggregated_id, status)`` order, the open
        row of an event before its closed row.
        """
        where = _where(since_ms=since_ms, until_ms=until_ms, equal={})
        records = self._fetch(AGGREGATED_EVENTS, where, limit=limit)
        return [AggregatedEventRow.from_record(record) for record in records]

    def count_rows(
        self,
        table: str,
        *,
        since_ms: int,
        until_ms: int,
        filters: Mapping[str, Sequence[str]] | None = None,
    ) -> int:
        """Return how many rows of ``table`` in ``[since_ms, until_ms)`` match.

        ``filters`` maps a column (see :data:`FILTER_COLUMNS`) to the values
        allowed; an empty or missing list does not filter.

        Raises:
            ValueError: an unknown table or a column that cannot filter it.
        """
        spec = _spec_of(table)
        where = _where_in(spec, since_ms=since_ms, until_ms=until_ms, filters=filters)
        return self._count(spec, where)

    def fetch_rows(
        self,
        table: str,
        *,
        since_ms: int,
        until_ms: int,
        filters: Mapping[str, Sequence[str]] | None = None,
        limit: int = DEFAULT_FETCH_LIMIT,
    ) -> list[DetectorEventRow] | list[AggregatedEventRow]:
        """Return rows of ``table`` in ``[since_ms, until_ms)`` that match ``filters``.

        Rows come in ``(event_time_ms, <key>)`` order, as in
        :meth:`fetch_detector_events`; page the same way.

        Raises:
            ValueError: an unknown table or a column that cannot filter it.
        """
        spec = _spec_of(table)
        where = _where_in(spec, since_ms=since_ms, until_ms=until_ms, filters=filters)
        records = self._fetch(spec, where, limit=limit)
        if spec is DETECTOR_EVENTS:
            return [DetectorEventRow.from_record(record) for record in records]
        return [AggregatedEventRow.from_record(record) for record in records]

    def drop_partitions_older_than(
        self, days: int, *, now_ms: int | None = None
    ) -> int:
        """Drop every daily partition whose rows were all stored ``days`` ago.

        This is the retention of servers without TTL, and it counts from when a
        row was stored (``inserted_at``), as the TTL does: a recording replayed
        today is kept as long as live data. Where TTL runs too it is harmless,
        and frees a whole expired day at once instead of at the next merge.
        Several workers may run it at the same time. Returns how many
        partitions were dropped over both tables.
        """
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        cutoff_s = (now_ms - days * _DAY_MS) // 1000
        dropped = 0
        for spec in (DETECTOR_EVENTS, AGGREGATED_EVENTS):
            dropped += self._drop_stored_before(spec, cutoff_s)
        return dropped

    def _table(self, spec: TableSpec) -> str:
        return f"{quote_identifier(self.database)}.{quote_identifier(spec.name)}"

    def _insert_new(self, spec: TableSpec, rows: Sequence[_Row]) -> int:
        """Insert the rows whose key the table does not hold yet.

        1. Keep the first row of each key within the batch.
        2. Ask, one UTC day (partition) at a time, which keys exist already.
        3. Insert the rest in one INSERT; return how many rows that was.
        """
        # Step 1.
        unique = list({row.key(): row for row in reversed(rows)}.values())
        unique.reverse()

        # Step 2.
        existing = self._existing_keys(spec, unique)
        fresh = [row for row in unique if row.key() not in existing]

        # Step 3.
        if fresh:
            self._insert(spec, [row.record() for row in fresh])
        if existing:
            logger.info(
                "skipped rows already stored: table=%s skipped=%d inserted=%d",
                spec.name,
                len(unique) - len(fresh),
                len(fresh),
            )
        return len(fresh)

    def _existing_keys(
        self, spec: TableSpec, rows: Sequence[_StoredRow]
    ) -> set[tuple[str, ...]]:
        """Return the keys of ``rows`` that the table holds already.

        One UTC day (partition) at a time, the batch's keys are asked by name
        within the batch's time range. The server does the matching and
        usually answers with nothing; reading back every key of the time range
        instead made the writer thread decode several times the batch's keys
        in Python, and took a third of the worker's GIL at 3,000 events/s.
        """
        existing: set[tuple[str, ...]] = set()
        for day_rows in _by_utc_day(rows):
            existing |= self._keys_by_name(spec, _time_range(day_rows), day_rows)
        return existing

    def _keys_by_name(
        self, spec: TableSpec, time_range: str, rows: Sequence[_StoredRow]
    ) -> set[tuple[str, ...]]:
        """Return which keys of ``rows`` are stored, asking by name."""
        key_columns = ", ".join(spec.key)
        key_expr = key_columns if len(spec.key) == 1 else f"({key_columns})"
        found: set[tuple[str, ...]] = set()

        for chunk in _chunks(rows, _KEYS_PER_QUERY):
            records = self._select(
                f"SELECT {key_columns} FROM {self._table(spec)} "
                f"WHERE {time_range} AND {key_expr} IN ({_key_list(chunk)})"
            )
            found.update(_as_key(record) for record in records)
        return found

    def _count(self, spec: TableSpec, where: str) -> int:
        rows = self._select(f"SELECT count() FROM {self._table(spec)}{where}")
        return int(rows[0][0])

    def _fetch(
        self, spec: TableSpec, where: str, *, limit: int
    ) -> list[tuple[Any, ...]]:
        columns = ", ".join(spec.column_names)
        order = ", ".join(("event_time_ms", *spec.key))
        return self._select(
            f"SELECT {columns} FROM {self._table(spec)}{where} "
            f"ORDER BY {order} LIMIT {int(limit)}"
        )

    def _drop_stored_before(self, spec: TableSpec, cutoff_s: int) -> int:
        """Drop the days of ``spec`` whose rows were all stored before ``cutoff_s``.

        1. Look only at days that end before the cutoff's UTC day: a later day
           holds events that happened after the cutoff, so it was written to
           after it (or within the clock skew the ingest allows; such a day
           goes the next day). Whole days, so that every row of a day counts.
        2. Find the newest ``inserted_at`` of each of those days.
        3. Drop the days stored entirely before the cutoff, one at a time; a
           day another worker dropped first is not an error.
        """
        # Step 1.
        first_kept_day_s = cutoff_s - cutoff_s % (_DAY_MS // 1000)

        # Step 2.
        newest = self._select(
            f"SELECT toYYYYMMDD(event_time) AS day, toUInt32(max(inserted_at)) "
            f"FROM {self._table(spec)} "
            f"WHERE event_time < toDateTime({first_kept_day_s}) GROUP BY day"
        )
        expired = sorted(str(day) for day, stored_s in newest if stored_s < cutoff_s)

        # Step 3.
        for partition_id in expired:
            self._execute(
                f"ALTER TABLE {self._table(spec)} "
                f"DROP PARTITION ID {sql_string(partition_id)}"
            )
        if expired:
            logger.info(
                "dropped expired partitions: table=%s stored_before=%d partitions=%s",
                spec.name,
                cutoff_s,
                ",".join(expired),
            )
        return len(expired)


def _where(
    *, since_ms: int | None, until_ms: int | None, equal: dict[str, str | None]
) -> str:
    """Return a WHERE clause (with a leading space) or ``""`` without filters.

    A time bound filters ``event_time`` too, so that partitions and the sorting
    key prune the scan; ``event_time_ms`` then makes the bound exact.
    """
    conditions: list[str] = []
    if since_ms is not None:
        conditions.append(f"event_time >= toDateTime({int(since_ms) // 1000})")
        conditions.append(f"event_time_ms >= {int(since_ms)}")
    if until_ms is not None:
        conditions.append(f"event_time <= toDateTime({int(until_ms) // 1000})")
        conditions.append(f"event_time_ms < {int(until_ms)}")
    for column, value in equal.items():
        if value is not None:
            conditions.append(f"{column} = {sql_string(str(value))}")

    return f" WHERE {' AND '.join(conditions)}" if conditions else ""


#: Columns a replay or a query may filter on, per table.
FILTER_COLUMNS: dict[str, frozenset[str]] = {
    DETECTOR_EVENTS.name: frozenset(
        {"camera_id", "site_id", "zone_id", "detector", "label", "outcome", "source"}
    ),
    AGGREGATED_EVENTS.name: frozenset(
        {"camera_id", "site_id", "zone_id", "detector", "label", "type", "status"}
    ),
}


def _spec_of(table: str) -> TableSpec:
    for spec in (DETECTOR_EVENTS, AGGREGATED_EVENTS):
        if spec.name == table:
            return spec
    raise ValueError(f"no such table: {table!r}")


def _where_in(
    spec: TableSpec,
    *,
    since_ms: int,
    until_ms: int,
    filters: Mapping[str, Sequence[str]] | None,
) -> str:
    """Return the WHERE clause of a time range and ``column IN (...)`` filters."""
    where = _where(since_ms=since_ms, until_ms=until_ms, equal={})
    conditions = [where.removeprefix(" WHERE ")] if where else []
    for column, values in sorted((filters or {}).items()):
        if column not in FILTER_COLUMNS[spec.name]:
            raise ValueError(f"cannot filter {spec.name} by {column!r}")
        if values:
            listed = ", ".join(sql_string(str(value)) for value in values)
            conditions.append(f"{column} IN ({listed})")
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""


def _time_range(rows: Sequence[_StoredRow]) -> str:
    """Return the condition on ``event_time`` (seconds) that covers ``rows``."""
    lo_s = min(row.event_time_ms for row in rows) // 1000
    hi_s = max(row.event_time_ms for row in rows) // 1000
    return f"event_time >= toDateTime({lo_s}) AND event_time <= toDateTime({hi_s})"


def _as_key(record: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(value) for value in record)


def _key_list(rows: Sequence[_StoredRow]) -> str:
    keys = (row.key() for row in rows)
    return ", ".join(_key_literal(key) for key in keys)


def _key_literal(key: tuple[str, ...]) -> str:
    if len(key) == 1:
        return sql_string(key[0])
    return "(" + ", ".join(sql_string(part) for part in key) + ")"


def _by_utc_day(rows: Sequence[_Row]) -> Iterator[list[_Row]]:
    days: dict[int, list[_Row]] = {}
    for row in rows:
        days.setdefault(row.event_time_ms // _DAY_MS, []).append(row)
    yield from days.values()


def _chunks(rows: Sequence[_Row], size: int) -> Iterator[Sequence[_Row]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
