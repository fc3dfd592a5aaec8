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
from tables.changelog import ChangelogStore

__all__ = ["EpisodePaneStore", "episode_table"]

episode_table = app.Table(
    "episode-panes",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="json"),
    help="Observations of global objects by (global id, hopping-window pane).",
)


class EpisodePaneStore(ChangelogStore):
    """Writes panes to the episode table and queues their changelog records."""

    def __init__(self, table: Any = episode_table) -> None:
        super().__init__(table)

    def put(self, key: PaneKey, observations: list[list[Any]] | None) -> None:
        """Store a pane's observations; ``None`` deletes the pane."""
        self.write(list(key), observations)

    def panes(self) -> Iterator[tuple[PaneKey, list[list[Any]]]]:
        """Yield every pane this worker holds."""
        for key, observations in self.table.data.items():
            global_id, pane_ms = key  # a JSON list
            yield (str(global_id), int(pane_ms)), observations
