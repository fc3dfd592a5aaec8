"""The dedup table: spans by ``(dedup key, tumbling window)``, RocksDB-backed.

A tumbling windowed table of ``window_s`` keyed by dedup key; every window holds
the spans that started in it (see :mod:`aggregator_app.dedup`). It is read and
written only inside the dedup agent, so its partitions follow the
``detector-events`` topic (keyed by camera id): co-partitioned by construction.

Faust expires windows by the wall clock, which would drop replayed or late
data at once; the table is therefore declared without ``expires``, and the
dedup agent deletes windows by event time (the partition's watermark) instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faust

from aggregator_app.app import app, rules
from aggregator_app.dedup import Span, WindowKey
from tables.changelog import ChangelogStore

__all__ = ["TableSpanStore", "dedup_table"]

dedup_table = app.Table(
    "dedup-spans",
    default=None,
    partitions=rules.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="json"),
    help="Dedup spans by (dedup key, 5 s tumbling window of event time).",
).tumbling(rules.dedup.window_s, expires=None)


class TableSpanStore(ChangelogStore):
    """A :class:`~aggregator_app.dedup.SpanStore` over the dedup table.

    Must be used inside an agent's iteration over a batch of a partition
    co-partitioned with the table: a change is written to that partition of
    the table at once, and queued as a changelog record. The agent sends the
    queued records with the rest of the batch's output
    (:meth:`take_changelog`), instead of faust's one-record-at-a-time
    changelog path; recovery reads them like any changelog record.
    """

    def __init__(self, table: Any = dedup_table) -> None:
        # The windowed wrapper picks windows by the current event's time; spans
        # name their window explicitly, so the underlying table is used.
        super().__init__(table.table)
        self._half_window_s = rules.dedup.window_s / 2

    def _key(self, window: WindowKey) -> tuple[str, tuple[float, float]]:
        key, start_ms = window
        return key, self.table.window.current(start_ms / 1000 + self._half_window_s)

    def get(self, window: WindowKey) -> list[Span] | None:
        stored = self.table.get(self._key(window))
        if stored is None:
            return None
        return [Span.from_json(item) for item in stored]

    def put(self, window: WindowKey, spans: list[Span]) -> None:
        self.write(self._key(window), [span.to_json() for span in spans])

    def delete(self, window: WindowKey) -> None:
        self.write(self._key(window), None)

    def windows(self) -> Iterator[tuple[WindowKey, list[Span]]]:
        """Yield every window this worker holds, active and standby partitions."""
        for (key, (start_s, _end_s)), stored in self.table.data.items():
            spans = [Span.from_json(item) for item in stored]
            yield (key, round(start_s * 1000)), spans
