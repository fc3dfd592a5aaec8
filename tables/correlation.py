"""The correlation table: one site's correlation state per key, RocksDB-backed.

Keyed by site id and read and written only by the correlation agent, whose
topic (``<app>-correlation``) is keyed by site id too: co-partitioned by
construction. Like the dedup table, a change is written to RocksDB at once
and its changelog record travels with the batch's output
(:class:`~aggregator_app.outbox.Outbox`), so the state survives a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import faust

from aggregator_app.app import app, rules
from aggregator_app.correlate import SiteState

__all__ = ["TableSiteStore", "correlation_table"]

correlation_table = app.Table(
    "correlation-sites",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="raw"),
    help="Correlation state (tracks, pending events, watermarks) by site id.",
)


class TableSiteStore:
    """Site states in the correlation table; changelog records queued for the agent.

    TODO: the whole state of a site is one value, rewritten once per batch;
    a site with thousands of open tracks wants one key per track. Split it
    when a site's state passes some hundred kilobytes.
    """

    def __init__(self, table: Any = correlation_table) -> None:
        self.table = table
        self._changes: list[tuple[bytes, bytes | None]] = []

    def put(self, state: SiteState) -> None:
        """Write a site's state and queue its changelog record."""
        store = self.table.data
        key = store._encode_key(state.site_id)
        value = json.dumps(state.to_json()).encode()
        store._set(key, value)
        self._changes.append((key, value))

    def states(self) -> Iterator[SiteState]:
        """Yield every site state this worker holds."""
        for _site_id, value in self.table.data.items():
            raw = value if isinstance(value, bytes | str) else json.dumps(value)
            yield SiteState.from_json(json.loads(raw))

    def take_changelog(self) -> list[tuple[bytes, bytes | None]]:
        """Return the changelog records queued since the last call, in order."""
        changes, self._changes = self._changes, []
        return changes

    @property
    def changelog_topic(self) -> str:
        """Return the name of the table's changelog topic."""
        return str(self.table.changelog_topic.get_topic_name())

    def on_changelog_sent(self, metadata: Any) -> None:
        """Remember, in RocksDB, the changelog offset this state includes."""
        self.table.data.set_persisted_offset(metadata.topic_partition, metadata.offset)
