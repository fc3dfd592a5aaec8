"""The correlation table: each site's correlation state, RocksDB-backed.

Keyed by strings that start with the site id, read and written only by the
correlation agent, whose topic (``<app>-correlation``) is keyed by site id
too: co-partitioned by construction. Two kinds of key:

* ``<site>`` holds the site's tracks, watermarks and recent assignments;
* ``<site>|pending|<event id>`` holds one event waiting for the watermark
  (a fast replay may buffer thousands; one value would pass Kafka's 1 MiB).

Like the dedup table, a change is written to RocksDB at once and its
changelog record travels with the batch's output
(:class:`~aggregator_app.outbox.Outbox`), so the state survives a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import faust

from aggregator_app.app import app, rules
from aggregator_app.correlate import SiteState
from aggregator_app.schema import DetectorEvent

__all__ = ["TableSiteStore", "correlation_table"]

_PENDING = "|pending|"

correlation_table = app.Table(
    "correlation-sites",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="raw"),
    help="Correlation state (tracks, watermarks; pending events) by site id.",
)


def _decoded(value: Any) -> dict[str, Any]:
    """Return a stored value as a dict.

    Values written by this worker come back as bytes; values recovered from
    the changelog come back already decoded by faust.
    """
    if isinstance(value, dict):
        return value
    decoded: dict[str, Any] = json.loads(value)
    return decoded


class TableSiteStore:
    """Site states in the correlation table; changelog records queued for the agent.

    TODO: the tracks of a site are one value, rewritten once per batch; a
    site with thousands of open tracks wants one key per track. Split them
    when a site's state passes some hundred kilobytes.
    """

    def __init__(self, table: Any = correlation_table) -> None:
        self.table = table
        self._changes: list[tuple[bytes, bytes | None]] = []
        self._stored_pending: dict[str, set[str]] = {}

    def put(self, state: SiteState) -> None:
        """Write a site's state, and its pending events that changed."""
        site_id = state.site_id
        self._set(site_id, json.dumps(state.to_json(with_pending=False)).encode())

        stored = self._stored_pending.setdefault(site_id, set())
        current = {event.event_id: event for event in state.pending}
        for event_id in current.keys() - stored:
            self._set(
                f"{site_id}{_PENDING}{event_id}", current[event_id].json_text.encode()
            )
        for event_id in stored - current.keys():
            self._delete(f"{site_id}{_PENDING}{event_id}")
        self._stored_pending[site_id] = set(current)

    def _set(self, key: str, value: bytes) -> None:
        store = self.table.data
        encoded = store._encode_key(key)
        store._set(encoded, value)
        self._changes.append((encoded, value))

    def _delete(self, key: str) -> None:
        store = self.table.data
        encoded = store._encode_key(key)
        store._del(encoded)
        self._changes.append((encoded, None))

    def states(self) -> Iterator[SiteState]:
        """Yield every site state this worker holds, with its pending events."""
        states: dict[str, SiteState] = {}
        pending: dict[str, list[DetectorEvent]] = {}
        for key, value in self.table.data.items():
            data = _decoded(value)
            if _PENDING in key:
                site_id = key.split(_PENDING, 1)[0]
                pending.setdefault(site_id, []).append(
                    DetectorEvent.model_validate(data)
                )
            else:
                states[key] = SiteState.from_json(data)
        self._stored_pending = {}
        for site_id, state in states.items():
            state.pending = pending.get(site_id, [])
            self._stored_pending[site_id] = {e.event_id for e in state.pending}
            yield state

    def forget(self) -> None:
        """Forget which pending events are stored (after a rebalance)."""
        self._stored_pending.clear()

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
