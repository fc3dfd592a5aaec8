"""The correlation table: each site's correlation state, RocksDB-backed.

Keyed by strings that start with the site id, read and written only by the
correlation agent, whose topic (``<app>-correlation``) is keyed by site id
too: co-partitioned by construction. Two kinds of key:

* ``<site>`` holds the site's watermarks and the late events it remembers;
* ``<site>|track|<global id>`` holds one track;
* ``<site>|recent|<bucket ms>`` holds the assignments of the events of
  100 ms of event time (to give a redelivered event its id again);
* ``<site>|pending|<event id>`` holds one event waiting for the watermark.

A busy site holds thousands of tracks and assignments: as one value it
would pass Kafka's 1 MiB record limit, and the changelog send would fail.
Split, every value stays small, and a batch writes only what it changed.

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
from aggregator_app.correlate import SiteState, Track
from aggregator_app.schema import DetectorEvent
from tables.changelog import ChangelogStore

__all__ = ["TableSiteStore", "correlation_table"]

_PENDING = "|pending|"
_TRACK = "|track|"
_RECENT = "|recent|"
_BUCKET_MS = 100

correlation_table = app.Table(
    "correlation-sites",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="raw"),
    help="Correlation state (tracks, watermarks; pending events) by site id.",
)


def _split(key: str) -> tuple[str, str, str]:
    """Return ``(site id, kind, name)`` of a key; kind is ``""`` for the header."""
    for kind in (_TRACK, _RECENT, _PENDING):
        if kind in key:
            site_id, name = key.split(kind, 1)
            return site_id, kind, name
    return key, "", ""


def _track_mark(track: Track) -> tuple[Any, ...]:
    """Return what changes whenever a track does (cheaper than its JSON)."""
    return (
        track.last_ms,
        track.member_count,
        track.closed,
        track.merged_into,
        len(track.all_cameras),
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


class TableSiteStore(ChangelogStore):
    """Site states in the correlation table; changelog records queued for the agent."""

    def __init__(self, table: Any = correlation_table) -> None:
        super().__init__(table)
        # What is stored, per site, to write only what changed.
        self._stored_pending: dict[str, set[str]] = {}
        self._stored_header: dict[str, bytes] = {}
        self._stored_tracks: dict[str, dict[str, tuple[Any, ...]]] = {}
        self._stored_buckets: dict[str, dict[int, int]] = {}

    def put(self, state: SiteState) -> None:
        """Write what changed of a site: header, tracks, assignments, pending."""
        self._put_header(state)
        self._put_tracks(state)
        self._put_recent(state)
        self._put_pending(state)

    def _put_header(self, state: SiteState) -> None:
        site_id = state.site_id
        header = json.dumps(
            {
                "site_id": site_id,
                "watermark_ms": state.watermark_ms,
                "camera_watermark_ms": state.camera_watermark_ms,
                "late_ids": state.late_ids,
            }
        ).encode()
        if self._stored_header.get(site_id) != header:
            self.write(site_id, header)
            self._stored_header[site_id] = header

    def _put_tracks(self, state: SiteState) -> None:
        site_id = state.site_id
        stored = self._stored_tracks.setdefault(site_id, {})
        for global_id, track in state.tracks.items():
            mark = _track_mark(track)
            if stored.get(global_id) != mark:
                self.write(
                    f"{site_id}{_TRACK}{global_id}",
                    json.dumps(track.to_json()).encode(),
                )
                stored[global_id] = mark
        for global_id in stored.keys() - state.tracks.keys():
            self.write(f"{site_id}{_TRACK}{global_id}", None)
            del stored[global_id]

    def _put_recent(self, state: SiteState) -> None:
        site_id = state.site_id
        buckets: dict[int, dict[str, list[Any]]] = {}
        for event_id, global_id in state.recent.items():
            time_ms = state.recent_ms.get(event_id, 0)
            bucket = buckets.setdefault(time_ms - time_ms % _BUCKET_MS, {})
            bucket[event_id] = [global_id, time_ms]
        stored = self._stored_buckets.setdefault(site_id, {})
        for bucket_ms, entries in buckets.items():
            if stored.get(bucket_ms) != len(entries):
                self.write(
                    f"{site_id}{_RECENT}{bucket_ms}", json.dumps(entries).encode()
                )
                stored[bucket_ms] = len(entries)
        for bucket_ms in stored.keys() - buckets.keys():
            self.write(f"{site_id}{_RECENT}{bucket_ms}", None)
            del stored[bucket_ms]

    def _put_pending(self, state: SiteState) -> None:
        site_id = state.site_id
        stored = self._stored_pending.setdefault(site_id, set())
        current = {event.event_id: event for event in state.pending}
        for event_id in current.keys() - stored:
            self.write(
                f"{site_id}{_PENDING}{event_id}", current[event_id].json_text.encode()
            )
        for event_id in stored - current.keys():
            self.write(f"{site_id}{_PENDING}{event_id}", None)
        self._stored_pending[site_id] = set(current)

    def states(self) -> Iterator[SiteState]:
        """Yield every site state this worker holds, put together from its keys."""
        self.forget()
        parts: dict[str, dict[str, Any]] = {}
        for key, value in self.table.data.items():
            site_id, kind, name = _split(key)
            part = parts.setdefault(
                site_id, {"header": None, "tracks": {}, "recent": {}, "pending": []}
            )
            data = _decoded(value)
            if kind == _TRACK:
                part["tracks"][name] = data
            elif kind == _RECENT:
                part["recent"].update(data)
            elif kind == _PENDING:
                part["pending"].append(DetectorEvent.model_validate(data))
            else:
                part["header"] = data
        for site_id, part in parts.items():
            if part["header"] is not None:
                yield self._assemble(site_id, part)

    def _assemble(self, site_id: str, part: dict[str, Any]) -> SiteState:
        header = part["header"]
        recent: dict[str, list[Any]] = part["recent"]
        state = SiteState.from_json(
            {
                **header,
                "pending": [],
                "tracks": part["tracks"],
                "recent": {event_id: entry[0] for event_id, entry in recent.items()},
                "recent_ms": {event_id: entry[1] for event_id, entry in recent.items()},
            }
        )
        state.pending = part["pending"]
        # Remember what is stored, so that the next put writes only changes.
        self._stored_header[site_id] = b""
        self._stored_tracks[site_id] = {
            global_id: _track_mark(track) for global_id, track in state.tracks.items()
        }
        buckets: dict[int, int] = {}
        for time_ms in state.recent_ms.values():
            bucket_ms = time_ms - time_ms % _BUCKET_MS
            buckets[bucket_ms] = buckets.get(bucket_ms, 0) + 1
        self._stored_buckets[site_id] = buckets
        self._stored_pending[site_id] = {e.event_id for e in state.pending}
        return state

    def forget(self) -> None:
        """Forget what is stored (after a rebalance); the next put writes it all."""
        self._stored_pending.clear()
        self._stored_header.clear()
        self._stored_tracks.clear()
        self._stored_buckets.clear()
