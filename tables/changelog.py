"""What every table of the service shares: changes written at once, sent in batches.

Faust writes a table's changelog one record at a time, as the agent goes.
The agents of this service handle a fetched batch at a time instead: a store
writes its changes to RocksDB at once and queues their changelog records;
the agent sends them with the rest of the batch's output
(:class:`~aggregator_app.outbox.Outbox`), so the batch is acknowledged only
once the broker has them. Recovery reads them like any changelog record.

A store must be used inside an agent's iteration over a batch of a
partition co-partitioned with its table.
"""

from __future__ import annotations

from typing import Any

from aggregator_app.outbox import Outbox

__all__ = ["ChangelogStore"]


class ChangelogStore:
    """A faust table written directly, its changelog queued for the batch."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._changes: list[tuple[bytes, bytes | None]] = []

    def write(self, key: Any, value: Any | None) -> None:
        """Store ``value`` under ``key`` (``None`` deletes it), and queue the change."""
        store = self.table.data
        raw_key = store._encode_key(key)
        if value is None:
            store._del(raw_key)
            self._changes.append((raw_key, None))
            return
        raw_value = store._encode_value(value)
        store._set(raw_key, raw_value)
        self._changes.append((raw_key, raw_value))

    def take_changelog(self) -> list[tuple[bytes, bytes | None]]:
        """Return the changelog records queued since the last call, in order."""
        changes, self._changes = self._changes, []
        return changes

    @property
    def changelog_topic(self) -> str:
        """Return the name of the table's changelog topic."""
        return str(self.table.changelog_topic.get_topic_name())

    async def send_changelog(self, partition: int, outbox: Outbox) -> None:
        """Queue the changes in ``outbox``; remember the last one's offset once sent.

        One partition's records arrive in order, so the offset of the last
        record covers the ones before it: one RocksDB write per batch.
        """
        topic = self.changelog_topic
        changes = self.take_changelog()
        for index, (key, value) in enumerate(changes, start=1):
            await outbox.send(
                topic,
                key=key,
                value=value,
                partition=partition,
                on_sent=self._on_changelog_sent if index == len(changes) else None,
            )

    def _on_changelog_sent(self, metadata: Any) -> None:
        """Remember, in RocksDB, the changelog offset this worker's state includes.

        A restart with the same data directory then reads the changelog from
        there on only, as faust does for its own changelog writes.
        """
        self.table.data.set_persisted_offset(metadata.topic_partition, metadata.offset)
