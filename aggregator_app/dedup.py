"""Deduplication of detector events: the pure core, without Kafka or faust.

Rule: an event repeats the *kept* event of its dedup key when their event times
are less than ``window_s`` apart; a repeat is dropped and recorded on the kept
event (its *span*). An event with the id of one already seen in the span is a
*redelivery* (a producer retry); any other repeat is a *repeat*. Otherwise the
event is kept and opens a new span.

The dedup key says what "the same thing" is:

* with a tracker id: camera, detector and tracker id;
* without one: camera, detector, label and a position cell (ground plane in
  metres when known, else the normalised box centre); the neighbouring cells
  are searched too, so that a position on a cell edge still matches.

Spans live in tumbling windows of ``window_s`` by the *start* time of the span;
looking an event up reads the window of its own time and the ones on each side,
so a window boundary never decides the outcome. Times are always event times:
the per-partition watermark (highest event time seen) decides when a span
closes and when its window can be forgotten, never the wall clock, so replayed
data deduplicates as it did live. Events may arrive out of order by up to
``grace_s`` of event time and are still absorbed. A partition that receives nothing for
``close_after_idle_s`` of wall-clock time closes its open spans too.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from aggregator_app.schema import DetectorEvent
from rules.config import DedupRule

__all__ = [
    "Decision",
    "Deduplicator",
    "MemorySpanStore",
    "Outcome",
    "Span",
    "SpanStore",
    "dedup_keys",
]

Outcome = Literal["kept", "repeat", "redelivery", "reprocessed"]
WindowKey = tuple[str, int]


@dataclass(slots=True)
class Span:
    """A kept event and what it absorbed."""

    kept_id: str
    start_ms: int
    last_ms: int
    partition: int
    kept_json: str
    kept_position: str = ""
    absorbed_count: int = 0
    absorbed_ids: list[str] = field(default_factory=list)
    closed: bool = False

    def to_json(self) -> dict[str, object]:
        """Return the span as a JSON-ready dict (the table's value format)."""
        return {
            "kept_id": self.kept_id,
            "start_ms": self.start_ms,
            "last_ms": self.last_ms,
            "partition": self.partition,
            "kept_json": self.kept_json,
            "kept_position": self.kept_position,
            "absorbed_count": self.absorbed_count,
            "absorbed_ids": self.absorbed_ids,
            "closed": self.closed,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Span:
        """Build a span from :meth:`to_json` output."""
        return cls(**data)  # type: ignore[arg-type]  # keys are ours, written by to_json


@dataclass(frozen=True, slots=True)
class Decision:
    """What deduplication decided for one event."""

    outcome: Outcome
    key: str
    span: Span


class SpanStore(Protocol):
    """Where spans are kept: a dict in tests, a faust windowed table in the app."""

    def get(self, window: WindowKey) -> list[Span] | None:
        """Return the spans stored for ``(dedup key, window start ms)``."""

    def put(self, window: WindowKey, spans: list[Span]) -> None:
        """Store the spans of one window, replacing what was there."""

    def delete(self, window: WindowKey) -> None:
        """Forget one window."""


class MemorySpanStore:
    """A :class:`SpanStore` in a dict."""

    def __init__(self) -> None:
        self.windows: dict[WindowKey, list[Span]] = {}

    def get(self, window: WindowKey) -> list[Span] | None:
        return self.windows.get(window)

    def put(self, window: WindowKey, spans: list[Span]) -> None:
        self.windows[window] = spans

    def delete(self, window: WindowKey) -> None:
        self.windows.pop(window, None)


def dedup_keys(event: DetectorEvent, rule: DedupRule) -> tuple[str, list[str]]:
    """Return the event's own dedup key and every key it may repeat.

    Events with a tracker id have one key. Other events match the same label in
    their own position cell and the eight around it.
    """
    prefix = f"{event.camera_id}|{event.detector.value}"
    if event.tracker_id is not None:
        key = f"{prefix}|t|{event.tracker_id}"
        return key, [key]

    cell = _position_cell(event, rule)
    if cell is None:
        key = f"{prefix}|l|{event.label}"
        return key, [key]

    kind, cell_x, cell_y = cell
    base = f"{prefix}|{kind}|{event.label}"
    own = f"{base}|{cell_x}|{cell_y}"
    around = [
        f"{base}|{cell_x + dx}|{cell_y + dy}" for dx in (-1, 0, 1) for dy in (-1, 0, 1)
    ]
    return own, around


_Position = tuple[str, int, int, int]


def _parse_position(position: str) -> _Position | None:
    """Split ``topic/partition/offset[/index]``; ``None`` if it is not one."""
    parts = position.rsplit("/", 3)
    if len(parts) == 3:
        parts.append("0")
    try:
        topic, partition, offset, index = parts
        return topic, int(partition), int(offset), int(index)
    except ValueError:
        return None


def _kept_later(span: Span, position: _Position | None) -> bool:
    """Return whether a span was opened by a record after ``position``.

    After a worker dies, the dedup table may hold spans written after the last
    committed offset. The records from that offset on are read again; a span
    opened by a later record of the same partition does not exist yet at that
    point of the stream, and must not absorb them.
    """
    if position is None or not span.kept_position:
        return False
    kept = _parse_position(span.kept_position)
    if kept is None or kept[:2] != position[:2]:
        return False
    return kept[2:] > position[2:]


def _position_cell(
    event: DetectorEvent, rule: DedupRule
) -> tuple[str, int, int] | None:
    if event.position is not None:
        size_m = rule.cell_size_m
        return (
            "g",
            math.floor(event.position.x_m / size_m),
            math.floor(event.position.y_m / size_m),
        )
    if event.bbox is not None:
        center_x, center_y = event.bbox.center()
        size = rule.cell_size
        return "b", math.floor(center_x / size), math.floor(center_y / size)
    return None


class Deduplicator:
    """Decides, event by event, what is kept; tracks spans until they close.

    Not thread-safe; one instance serves the partitions of one worker. Every
    window it touches is remembered with its partition, so that spans can be
    closed and windows forgotten by that partition's watermark.

    With ``read_through=False`` a window missing from the cache is taken as
    empty, without reading the store: the owner has given every stored window
    to :meth:`load` (the worker does so after every rebalance). A lookup then
    costs no store read, which matters with up to 27 lookups per event.
    """

    def __init__(
        self, rule: DedupRule, store: SpanStore, *, read_through: bool = True
    ) -> None:
        self.rule = rule
        self.store = store
        self._read_through = read_through
        self._window_ms = int(rule.window_s * 1000)
        self._grace_ms = int(rule.grace_s * 1000)
        self._open: dict[WindowKey, int] = {}
        #: Per partition: a heap of (close time, key, window start) of open spans.
        self._due: dict[int, list[tuple[int, str, int]]] = {}
        self._watermark_ms: dict[int, int] = {}
        self._dirty: dict[WindowKey, int] = {}
        self._cache: dict[int, dict[WindowKey, list[Span]]] = {}

    def window_start_ms(self, time_ms: int) -> int:
        """Return the start of the tumbling window that holds ``time_ms``."""
        return time_ms - time_ms % self._window_ms

    def watermark_ms(self, partition: int) -> int | None:
        """Return the highest event time seen on a partition, if any."""
        return self._watermark_ms.get(partition)

    def observe(
        self,
        event: DetectorEvent,
        partition: int,
        position: str = "",
        *,
        latest_ms: int | None = None,
    ) -> Decision:
        """Decide whether ``event`` is kept, a repeat or a redelivery.

        ``position`` says where the event was read (topic, partition, offset).
        The kept event seen again at the same position is not a redelivery but
        this worker (or the one before it) reading it again after a restart:
        the outcome is ``reprocessed``, and its observation may be published
        again, with the same id.

        ``latest_ms`` caps how far the event moves the watermark: the
        worker's clock plus a small lead. An event dated in the future (a
        camera whose clock runs ahead) is deduplicated like any other, but
        cannot close the partition's spans early or make its other cameras'
        events late.

        Steps:
            1. Advance the partition's watermark.
            2. Find a span of any matching key that started within the window.
            3. Absorb the event into it, or open a new span.
        """
        time_ms = event.event_time_ms
        advance_ms = time_ms if latest_ms is None else min(time_ms, latest_ms)
        if advance_ms > self._watermark_ms.get(partition, -1):
            self._watermark_ms[partition] = advance_ms

        own_key, keys = dedup_keys(event, self.rule)
        match = self._find_span(keys, time_ms, partition, _parse_position(position))

        if match is None:
            return self._open_span(own_key, event, partition, position)
        window, span = match
        if (
            position
            and event.event_id == span.kept_id
            and position == span.kept_position
        ):
            return Decision(outcome="reprocessed", key=window[0], span=span)
        return self._absorb(window, span, event)

    def _find_span(
        self,
        keys: list[str],
        time_ms: int,
        partition: int,
        position: _Position | None,
    ) -> tuple[WindowKey, Span] | None:
        window_ms = self._window_ms
        first = self.window_start_ms(time_ms - window_ms)
        for key in keys:
            for start_ms in (first, first + window_ms, first + 2 * window_ms):
                window = (key, start_ms)
                for span in self._lookup(window, partition):
                    if abs(time_ms - span.start_ms) >= window_ms:
                        continue
                    if _kept_later(span, position):
                        continue
                    return window, span
        return None

    def _lookup(self, window: WindowKey, partition: int) -> list[Span]:
        cached = self._cache.get(partition, {}).get(window)
        if cached is not None or self._read_through:
            return cached if cached is not None else self._spans(window, partition)
        return []

    def _spans(self, window: WindowKey, partition: int) -> list[Span]:
        cache = self._cache.setdefault(partition, {})
        spans = cache.get(window)
        if spans is None:
            stored = self.store.get(window) if self._read_through else None
            spans = stored or []
            cache[window] = spans
            self._track_open(window, spans)
        return spans

    def _track_open(self, window: WindowKey, spans: Iterable[Span]) -> None:
        """Remember the open spans of a window, to close them when due."""
        for span in spans:
            if not span.closed:
                self._open[window] = span.partition
                self._push_due(window, span)

    def _push_due(self, window: WindowKey, span: Span) -> None:
        due_ms = span.start_ms + self._window_ms + self._grace_ms
        heapq.heappush(
            self._due.setdefault(span.partition, []), (due_ms, window[0], window[1])
        )

    def _open_span(
        self, key: str, event: DetectorEvent, partition: int, position: str
    ) -> Decision:
        time_ms = event.event_time_ms
        window = (key, self.window_start_ms(time_ms))
        span = Span(
            kept_id=event.event_id,
            start_ms=time_ms,
            last_ms=time_ms,
            partition=partition,
            kept_json=event.json_text,
            kept_position=position,
        )
        self._spans(window, partition).append(span)
        self._open[window] = partition
        self._push_due(window, span)
        self._dirty[window] = partition
        return Decision(outcome="kept", key=key, span=span)

    def _absorb(self, window: WindowKey, span: Span, event: DetectorEvent) -> Decision:
        event_id = event.event_id
        redelivered = event_id == span.kept_id or event_id in span.absorbed_ids
        outcome: Outcome = "redelivery" if redelivered else "repeat"

        if not redelivered:
            # A redelivery is the same event again: it adds nothing to count.
            span.absorbed_count += 1
        span.last_ms = max(span.last_ms, event.event_time_ms)
        if not redelivered and len(span.absorbed_ids) < self.rule.max_absorbed_ids:
            span.absorbed_ids.append(event_id)
        self._dirty[window] = span.partition
        return Decision(outcome=outcome, key=window[0], span=span)

    def take_dirty(self, partition: int) -> Iterator[tuple[WindowKey, list[Span]]]:
        """Yield every window of a partition changed since the last call."""
        cache = self._cache.get(partition, {})
        changed = [
            window for window, owner in self._dirty.items() if owner == partition
        ]
        for window in changed:
            del self._dirty[window]
            spans = cache.get(window)
            if spans is not None:
                yield window, spans

    def flush(self, partition: int) -> int:
        """Write every changed window of a partition to the store.

        Returns how many windows were written.
        """
        written = 0
        for window, spans in self.take_dirty(partition):
            self.store.put(window, spans)
            written += 1
        return written

    def close_due(
        self, *, partitions: Iterable[int] | None = None, force: bool = False
    ) -> list[tuple[str, Span]]:
        """Close the spans whose window has passed the partition's watermark.

        A span closes once the watermark is ``window_s + grace_s`` past its
        start: an event later than the grace period is late, and may open a
        span of its own. ``force`` closes every open
        span of the given partitions (idle partitions, shutdown).
        """
        chosen = list(self._due) if partitions is None else list(partitions)
        closed: list[tuple[str, Span]] = []
        for partition in chosen:
            if force:
                closed.extend(self._close_all(partition))
            else:
                closed.extend(self._close_due_in(partition))
        return closed

    def _close_due_in(self, partition: int) -> list[tuple[str, Span]]:
        """Close the due spans of a partition, earliest first.

        Only the spans that are due are looked at (a heap by close time), so
        a batch costs the same however many spans are open.
        """
        due = self._due.get(partition, [])
        watermark_ms = self._watermark_ms.get(partition, -1)
        closed: list[tuple[str, Span]] = []
        while due and due[0][0] <= watermark_ms:
            _due_ms, key, start_ms = heapq.heappop(due)
            window = (key, start_ms)
            if window in self._open:
                closed.extend(self._close_window(window, partition, force=False))
        return closed

    def _close_all(self, partition: int) -> list[tuple[str, Span]]:
        owned = [window for window, owner in self._open.items() if owner == partition]
        closed: list[tuple[str, Span]] = []
        for window in owned:
            closed.extend(self._close_window(window, partition, force=True))
        self._due.pop(partition, None)
        return closed

    def _close_window(
        self, window: WindowKey, partition: int, *, force: bool
    ) -> list[tuple[str, Span]]:
        watermark_ms = self._watermark_ms.get(partition, -1)
        closed = []
        still_open = False
        for span in self._spans(window, partition):
            if span.closed:
                continue
            if (
                force
                or watermark_ms >= span.start_ms + self._window_ms + self._grace_ms
            ):
                span.closed = True
                closed.append((window[0], span))
            else:
                still_open = True
        if closed:
            self._dirty[window] = partition
        if not still_open:
            self._open.pop(window, None)
        return closed

    def load(self, window: WindowKey, spans: list[Span]) -> None:
        """Take in a window read back from the store after a restart.

        Its open spans are tracked again, so that they close. The partition's
        watermark is not moved: the records after the last committed offset
        are read again, older than these spans, and must not find them closed
        and forgotten already.
        """
        if not spans:
            return
        partition = spans[0].partition
        self._cache.setdefault(partition, {})[window] = spans
        self._track_open(window, spans)

    def spans_near(self, key: str, time_ms: int) -> list[Span]:
        """Return the cached spans of ``key`` in the windows around ``time_ms``."""
        first = self.window_start_ms(time_ms - self._window_ms)
        found: list[Span] = []
        for cache in self._cache.values():
            for start_ms in (
                first,
                first + self._window_ms,
                first + 2 * self._window_ms,
            ):
                found.extend(cache.get((key, start_ms), ()))
        return found

    def has_open(self, partition: int) -> bool:
        """Return whether a partition has a span not yet closed."""
        return partition in self._open.values()

    def forget_before(self, partition: int, horizon_ms: int) -> int:
        """Drop closed windows of a partition that end before ``horizon_ms``.

        Returns how many windows holding spans were dropped from the store
        (windows cached as empty are dropped from memory only).
        """
        cache = self._cache.get(partition, {})
        old = [
            window
            for window, spans in cache.items()
            if window[1] + self._window_ms <= horizon_ms
            and all(span.closed for span in spans)
        ]
        dropped = 0
        for window in old:
            spans = cache.pop(window)
            self._dirty.pop(window, None)
            if spans:
                self.store.delete(window)
                dropped += 1
        return dropped

    def reset(self) -> None:
        """Forget every cached window (after a rebalance; the store stays).

        Changed windows must be flushed first; what is not flushed is lost.
        """
        self._cache.clear()
        self._open.clear()
        self._due.clear()
        self._dirty.clear()
