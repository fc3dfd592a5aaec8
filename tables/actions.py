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

__all__ = ["ActionStateStore", "action_table"]

action_table = app.Table(
    "action-state",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="json"),
    help="Per camera: events held by the action rules and the actions decided.",
)


class ActionStateStore:
    """Writes camera states to the action table and queues their changelog.

    Must be used inside an agent's iteration over a batch of a partition
    co-partitioned with the table, as :class:`tables.dedup.TableSpanStore`.
    """

    def __init__(self, table: Any = action_table) -> None:
        self.table = table
        self._changes: list[tuple[bytes, bytes | None]] = []

    def put(self, camera_id: str, state: dict[str, Any] | None) -> None:
        """Store a camera's state; ``None`` deletes it."""
        store = self.table.data
        key = store._encode_key(camera_id)
        if state is None:
            store._del(key)
            self._changes.append((key, None))
            return
        value = store._encode_value(state)
        store._set(key, value)
        self._changes.append((key, value))

    def states(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield every camera state this worker holds."""
        yield from self.table.data.items()

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
