"""The action table: each camera's held events and decided actions, RocksDB-backed.

Keyed by camera id; the value is :meth:`aggregator_app.actions.ActionMatcher.dump`
of that camera. It is written only where deduplication runs (the records of a
batch keyed by camera id), so its partitions follow the camera-keyed topics:
co-partitioned like the dedup table. Like the dedup table, its changes are
sent with the rest of a batch's output and recovery reads them as any
changelog record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faust

from aggregator_app.app import app, rules
from tables.changelog import ChangelogStore

__all__ = ["ActionStateStore", "action_table"]

action_table = app.Table(
    "action-state",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="json"),
    help="Per camera: events held by the action rules and the actions decided.",
)


class ActionStateStore(ChangelogStore):
    """Writes camera states to the action table and queues their changelog.

    Must be used inside an agent's iteration over a batch of a partition
    co-partitioned with the table, as :class:`tables.dedup.TableSpanStore`.
    """

    def __init__(self, table: Any = action_table) -> None:
        super().__init__(table)

    def put(self, camera_id: str, state: dict[str, Any] | None) -> None:
        """Store a camera's state; ``None`` deletes it."""
        self.write(camera_id, state)

    def states(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield every camera state this worker holds."""
        yield from self.table.data.items()
