"""The episode table: observations of global objects by hopping-window pane.

Keyed by ``[global id, pane start ms]`` (see :mod:`aggregator_app.episodes`),
the value is the pane's observations. It is read and written inside the
correlation agent, on the partition of the correlation topic that holds the
object's site, so the table's partitions follow that topic (co-partitioned).
Changes are sent with the batch's output, as the dedup table's are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faust

from aggregator_app.app import app, rules
from aggregator_app.episodes import PaneKey

__all__ = ["EpisodePaneStore", "episode_table"]

episode_table = app.Table(
    "episode-panes",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="json"),
    help="Observations of global objects by (global id, hopping-window pane).",
)


class EpisodePaneStore:
    """Writes panes to the episode table and queues their changelog records."""

    def __init__(self, table: Any = episode_table) -> None:
        self.table = table
        self._changes: list[tuple[bytes, bytes | None]] = []

    def put(self, key: PaneKey, observations: list[list[Any]] | None) -> None:
        """Store a pane's observations; ``None`` deletes the pane."""
        store = self.table.data
        raw_key = store._encode_key(list(key))
        if observations is None:
            store._del(raw_key)
            self._changes.append((raw_key, None))
            return
        value = store._encode_value(observations)
        store._set(raw_key, value)
        self._changes.append((raw_key, value))

    def panes(self) -> Iterator[tuple[PaneKey, list[list[Any]]]]:
        """Yield every pane this worker holds."""
        for key, observations in self.table.data.items():
            global_id, pane_ms = key  # a JSON list
            yield (str(global_id), int(pane_ms)), observations

    def take_changelog(self) -> list[tuple[bytes, bytes | None]]:
        """Return the changelog records queued since the last call, in order."""
        changes, self._changes = self._changes, []
        return changes

    @property
    def changelog_topic(self) -> str:
        """Return the name of the table's changelog topic."""
        return str(self.table.changelog_topic.get_topic_name())

    def on_changelog_sent(self, metadata: Any) -> None:
        """Remember, in RocksDB, the changelog offset this worker's state includes."""
        self.table.data.set_persisted_offset(metadata.topic_partition, metadata.offset)
