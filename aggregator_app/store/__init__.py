"""The ClickHouse event store: a server over the native protocol, or embedded.

``open_store(url)`` picks the backend from a URL:

- ``clickhouse://[user[:password]@]host[:port][/database]``: a ClickHouse
  server (18.16 or later) over the native protocol, port 9000 by default;
- ``chdb:///absolute/dir`` or ``chdb://relative/dir``: embedded ClickHouse
  (chdb) in this process, its data in that directory;
- ``None``: embedded, in ``default_dir`` (``.var/chdb``).

The database is ``aggregator`` unless the URL names one (``chdb:`` URLs take
``?database=name``). Rows are written through :class:`StoreWriter`, which
batches them off the event loop.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from aggregator_app.exceptions import ConfigError
from aggregator_app.store.base import (
    DEFAULT_DATABASE,
    DEFAULT_TTL_DAYS,
    AggregatedEventRow,
    ClickHouseStore,
    DetectorEventRow,
    EventStore,
    Outcome,
    action_event_row,
    aggregated_event_row,
    correlated_event_row,
    detector_event_row,
    episode_event_row,
)
from aggregator_app.store.embedded import DEFAULT_EMBEDDED_DIR, EmbeddedStore
from aggregator_app.store.native import DEFAULT_NATIVE_PORT, NativeStore
from aggregator_app.store.writer import StoreWriter, StoreWriterService

__all__ = [
    "AggregatedEventRow",
    "ClickHouseStore",
    "DetectorEventRow",
    "EmbeddedStore",
    "EventStore",
    "NativeStore",
    "Outcome",
    "StoreWriter",
    "StoreWriterService",
    "action_event_row",
    "aggregated_event_row",
    "correlated_event_row",
    "detector_event_row",
    "episode_event_row",
    "open_store",
]


def open_store(
    url: str | None,
    *,
    default_dir: Path = DEFAULT_EMBEDDED_DIR,
    ttl_days: int | None = DEFAULT_TTL_DAYS,
) -> EventStore:
    """Return the store a URL names (see the module docstring).

    Nothing is created yet: call ``ensure_schema()`` before the first write.

    Args:
        url: ``clickhouse://...``, ``chdb://...`` or ``None`` for embedded.
        default_dir: the embedded store's directory when ``url`` is ``None``.
        ttl_days: days kept by table TTL on servers that have it.

    Raises:
        ConfigError: the URL cannot be used.
        StoreError: the embedded engine cannot open its directory.
    """
    if url is None:
        return EmbeddedStore(default_dir, ttl_days=ttl_days)

    parts = urlsplit(url)
    if parts.scheme == "clickhouse":
        return _native_store(url, ttl_days=ttl_days)
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        database = parse_qs(parts.query).get("database", [DEFAULT_DATABASE])[-1]
        if not path:
            raise ConfigError(f"chdb URL without a directory: {url!r}")
        return EmbeddedStore(path, database=_database(database, url), ttl_days=ttl_days)

    raise ConfigError(f"store URL must start with clickhouse:// or chdb://: {url!r}")


def _native_store(url: str, *, ttl_days: int | None) -> NativeStore:
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_NATIVE_PORT
    except ValueError as exc:
        raise ConfigError(f"store URL has a bad port: {url!r}") from exc
    if not parts.hostname:
        raise ConfigError(f"store URL without a host: {url!r}")

    return NativeStore(
        host=parts.hostname,
        port=port,
        database=_database(parts.path.strip("/") or DEFAULT_DATABASE, url),
        user=unquote(parts.username or "default"),
        password=unquote(parts.password or ""),
        ttl_days=ttl_days,
    )


def _database(name: str, url: str) -> str:
    if not name.isidentifier() or not name.isascii():
        raise ConfigError(f"store URL names a bad database {name!r}: {url!r}")
    return name
