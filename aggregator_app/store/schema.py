"""The tables of the event store, written once for every ClickHouse we run on.

The oldest server we support is Debian's clickhouse-server 18.16, so the DDL uses
only what it has. What 18.16 lacks, and what stands in for it here:

- ``DateTime64``: the time is kept twice, ``event_time_ms UInt64`` (exact) and
  ``event_time DateTime('UTC')`` (seconds, derived from it by a ``DEFAULT``) for
  the partition key and the sorting key.
- ``TTL``: the retention clause is added only when the server has it
  (:func:`supports_ttl`); on 18.16 old days are dropped by
  ``EventStore.drop_partitions_older_than`` instead.
- ``LowCardinality`` and ``CODEC(...)``: plain ``String`` columns with the
  server's default LZ4; ``Enum8`` for the closed sets (dedup outcome, status).
- ``Map``, secondary (data skipping) indexes, query parameters
  (``{name:Type}``): not used; values are rendered with :func:`sql_string`.
- Insert deduplication on non-replicated tables: the store checks which keys
  exist before it inserts, and ``ReplacingMergeTree(version)`` is the second guard.

Both tables are partitioned by UTC day and sorted by
``(toStartOfHour(event_time), camera_id, event_time_ms, <key>)``: a time range
query prunes partitions and then hours, a camera query within a time range
narrows to that camera inside each hour, and the key at the end makes
``ReplacingMergeTree`` collapse only true repeats of one row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "AGGREGATED_EVENTS",
    "DETECTOR_EVENTS",
    "TableSpec",
    "create_database_sql",
    "create_table_sql",
    "quote_identifier",
    "sql_string",
    "supports_ttl",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# The first version with table TTL (``TTL expr`` in CREATE TABLE).
_TTL_SINCE_VERSION = (19, 6)

# Columns every table has after its own, computed by the server.
_DERIVED_COLUMNS = (
    ("event_time", "DateTime('UTC') DEFAULT toDateTime(intDiv(event_time_ms, 1000))"),
    ("inserted_at", "DateTime('UTC') DEFAULT now()"),
)


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One table: its name, the columns a client writes, and its row key.

    ``columns`` are ``(name, type)`` pairs in the order rows are written and read;
    ``key`` names the columns that identify one row (what a retry must not
    double).
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        """Return the names of the columns a client writes, in order."""
        return tuple(name for name, _ in self.columns)


DETECTOR_EVENTS = TableSpec(
    name="detector_events",
    columns=(
        ("event_id", "String"),
        ("outcome", "Enum8('kept' = 1, 'repeat' = 2, 'redelivery' = 3)"),
        ("kept_event_id", "String"),
        ("source", "String"),
        ("detector", "String"),
        ("camera_id", "String"),
        ("site_id", "String"),
        ("zone_id", "String"),
        ("label", "String"),
        ("confidence", "Nullable(Float32)"),
        ("event_time_ms", "UInt64"),
        ("tracker_id", "String"),
        ("position_x_m", "Nullable(Float32)"),
        ("position_y_m", "Nullable(Float32)"),
        ("payload", "String"),
        ("version", "UInt64"),
    ),
    key=("event_id",),
)

AGGREGATED_EVENTS = TableSpec(
    name="aggregated_events",
    columns=(
        ("aggregated_id", "String"),
        ("status", "Enum8('open' = 1, 'closed' = 2)"),
        ("type", "String"),
        ("rule_id", "String"),
        ("event_id", "String"),
        ("detector", "String"),
        ("camera_id", "String"),
        ("site_id", "String"),
        ("zone_id", "String"),
        ("label", "String"),
        ("confidence", "Nullable(Float32)"),
        ("event_time_ms", "UInt64"),
        ("end_time_ms", "UInt64"),
        ("absorbed_count", "UInt32"),
        ("tracker_id", "String"),
        ("position_x_m", "Nullable(Float32)"),
        ("position_y_m", "Nullable(Float32)"),
        ("payload", "String"),
        ("version", "UInt64"),
    ),
    key=("aggregated_id", "status"),
)


def quote_identifier(name: str) -> str:
    """Return ``name`` back-quoted, after checking it is a plain identifier.

    Raises:
        ValueError: ``name`` is not letters, digits and ``_`` (64 at most).
    """
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return f"`{name}`"


def sql_string(value: str) -> str:
    """Return ``value`` as a ClickHouse string literal."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def supports_ttl(server_version: str) -> bool:
    """Return whether a server of this version (``18.16.1``) has table TTL."""
    parts = re.findall(r"\d+", server_version)[:2]
    if len(parts) < 2:
        return False
    major, minor = (int(part) for part in parts)
    return (major, minor) >= _TTL_SINCE_VERSION


def create_database_sql(database: str) -> str:
    """Return the statement that creates ``database`` if it is missing."""
    return f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}"


def create_table_sql(database: str, spec: TableSpec, *, ttl_days: int | None) -> str:
    """Return the statement that creates the table of ``spec`` if it is missing.

    Args:
        database: the database that holds the table.
        spec: which table.
        ttl_days: add ``TTL inserted_at + INTERVAL <n> DAY``; ``None`` for a
            server without TTL (or to keep rows for ever). Retention counts
            from when a row was stored, not from its event time, so that a
            replayed recording is kept as long as live data.
    """
    columns = (*spec.columns, *_DERIVED_COLUMNS)
    column_lines = ",\n    ".join(f"{name} {kind}" for name, kind in columns)
    sort_key = ", ".join(
        ("toStartOfHour(event_time)", "camera_id", "event_time_ms", *spec.key)
    )
    ttl = ""
    if ttl_days is not None:
        ttl = f"TTL inserted_at + INTERVAL {int(ttl_days)} DAY\n"

    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}."
        f"{quote_identifier(spec.name)}\n"
        f"(\n    {column_lines}\n)\n"
        "ENGINE = ReplacingMergeTree(version)\n"
        "PARTITION BY toYYYYMMDD(event_time)\n"
        f"ORDER BY ({sort_key})\n"
        f"{ttl}"
        "SETTINGS index_granularity = 8192"
    )
