"""Writing rows to the event store in batches, off the event loop, losing none.

Agents hand rows to :class:`StoreWriter` (``submit_detector``,
``submit_aggregated``); that only appends to a buffer and returns. A background
thread writes the buffer every ``flush_interval_ms``, or as soon as
``batch_rows`` rows wait, one INSERT per table and batch.

Where rows go when they cannot be written now:

- **Store unreachable** (:class:`~aggregator_app.exceptions.StoreUnavailable`):
  the batch stays buffered and is retried with exponential backoff
  (``retry_initial_ms`` doubling up to ``retry_max_ms``).
- **Buffer full** (``max_buffer_rows``): rows that do not fit are appended to
  a spool file, ``<spool_dir>/<table>.jsonl`` (one JSON array of column values
  a line), by the caller, without waiting for the store. When the buffer is
  empty again and the store answers, the thread renames the spool file to
  ``<table>.<ns>.replay.jsonl``, writes it back a batch at a time and deletes
  it. Spool files left by a previous process are written back the same way.
- **Stop** with rows still unwritten (store down past the timeout): they are
  spooled too, and the next process writes them.
- **Store refuses a batch** (a non-retriable
  :class:`~aggregator_app.exceptions.StoreError`, e.g. a value the table
  cannot hold): the batch is appended to ``<table>.failed.jsonl`` for an
  operator and the writer goes on; renaming that file to ``<table>.jsonl``
  queues it again.

Writing back is safe to repeat because the store's inserts are idempotent: a
batch written twice (crash after the INSERT, before the spool was trimmed) is
stored once.

Durability before a Kafka commit: every row gets a sequence number in its
table's lane when it is submitted. ``submitted_mark()`` names every row
submitted so far; ``is_durable(mark)`` says whether all of them are stored or
on disk (spooled, or kept as failed), ``wait_durable(mark, timeout_s)`` waits
for that (writing at once, not at the next interval), and
``spool_through(mark)`` puts the ones still in memory on disk. A worker calls
these before it commits offsets (:mod:`aggregator_app.sink`), so that a row of
a committed event survives SIGKILL. Rows submitted after the mark are not
waited for. The spool is written without ``fsync``: a killed process loses
nothing, a machine that loses power may lose the last appends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import orjson
from mode import Service

from aggregator_app.exceptions import StoreError, StoreUnavailable
from aggregator_app.store.base import AggregatedEventRow, DetectorEventRow, EventStore

__all__ = ["DEFAULT_SPOOL_DIR", "DurableMark", "StoreWriter", "StoreWriterService"]

logger = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = Path(".var/spool")

_Row = TypeVar("_Row", DetectorEventRow, AggregatedEventRow)

#: The last sequence number submitted in each lane (detector, aggregated).
DurableMark = tuple[int, ...]


class _Spool:
    """The rows of one table kept on disk, oldest file first.

    ``append`` may be called from any thread; the reading side (``next_batch``,
    ``commit``, ``rewind``) only from the writer thread.
    """

    def __init__(self, directory: Path, table: str) -> None:
        self._directory = directory
        self._table = table
        self._lock = threading.Lock()
        self.active_path = directory / f"{table}.jsonl"
        self.failed_path = directory / f"{table}.failed.jsonl"
        self._reader: IO[bytes] | None = None
        self._reader_path: Path | None = None
        self._batch_offset = 0
        self._batch_lines = 0
        self.rows = sum(_count_lines(path) for path in self._files())

    def append(self, records: Sequence[Sequence[Any]]) -> None:
        """Add records at the end of the active spool file.

        Raises:
            StoreError: the spool file cannot be written.
        """
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        with self._lock:
            try:
                self._directory.mkdir(parents=True, exist_ok=True)
                with self.active_path.open("ab") as spool_file:
                    spool_file.write(data)
            except OSError as exc:
                raise StoreError(f"cannot spool rows: path={self.active_path}") from exc
            self.rows += len(records)

    def append_failed(self, records: Sequence[Sequence[Any]]) -> None:
        """Keep records the store refused, for an operator."""
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        self._directory.mkdir(parents=True, exist_ok=True)
        with self.failed_path.open("ab") as failed_file:
            failed_file.write(data)

    def next_batch(self, max_rows: int) -> tuple[list[Any], int]:
        """Read up to ``max_rows`` lines, from the oldest spool file on.

        Returns the records read and how many lines they took; no lines means
        every spool file has been read.
        """
        while True:
            reader = self._reader or self._open_next()
            if reader is None:
                return [], 0

            self._batch_offset = reader.tell()
            records, self._batch_lines = _read_records(
                reader, max_rows, path=self._reader_path
            )
            if self._batch_lines:
                return records, self._batch_lines
            self._finish_file()

    def commit(self) -> None:
        """Forget the batch just read: it is stored (or kept as failed)."""
        with self._lock:
            self.rows = max(0, self.rows - self._batch_lines)
            self._batch_lines = 0
        if self._reader is not None and self._at_end(self._reader):
            self._finish_file()

    def recount(self) -> None:
        """Count the rows on disk again: the count said rows, the files had none."""
        with self._lock:
            self.rows = sum(_count_lines(path) for path in self._files())

    def rewind(self) -> None:
        """Read the batch just read again next time (it was not stored)."""
        if self._reader is not None:
            self._reader.seek(self._batch_offset)

    def close(self) -> None:
        """Close the file being written back, if any; it is read again later."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _files(self) -> list[Path]:
        taken = sorted(self._directory.glob(f"{self._table}.*.replay.jsonl"))
        return [*taken, self.active_path] if self.active_path.exists() else taken

    def _open_next(self) -> IO[bytes] | None:
        taken = sorted(self._directory.glob(f"{self._table}.*.replay.jsonl"))
        if not taken:
            with self._lock:
                if not self.active_path.exists():
                    return None
                target = (
                    self._directory / f"{self._table}.{time.time_ns()}.replay.jsonl"
                )
                self.active_path.rename(target)
            taken = [target]

        self._reader_path = taken[0]
        self._reader = self._reader_path.open("rb")
        logger.info("writing spooled rows back: path=%s", self._reader_path)
        return self._reader

    @staticmethod
    def _at_end(reader: IO[bytes]) -> bool:
        # A file being written back is no longer appended to: its size is final.
        return reader.tell() >= os.fstat(reader.fileno()).st_size

    def _finish_file(self) -> None:
        if self._reader is None or self._reader_path is None:
            return
        self._reader.close()
        self._reader_path.unlink(missing_ok=True)
        logger.info("spool file written back: path=%s", self._reader_path)
        self._reader = None
        self._reader_path = None


def _read_records(
    reader: IO[bytes], max_lines: int, *, path: Path | None
) -> tuple[list[Any], int]:
    """Read up to ``max_lines`` lines; return the records and the lines read."""
    records: list[Any] = []
    lines = 0
    while lines < max_lines:
        line = reader.readline()
        if not line:
            break
        lines += 1
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            # Only a crash in the middle of an append leaves a partial line.
            logger.error("unreadable spool line skipped: path=%s line=%r", path, line)
    return records, lines


def _count_lines(path: Path) -> int:
    with path.open("rb") as spool_file:
        return sum(1 for _ in spool_file)


class _Lane(Generic[_Row]):
    """The buffer and the spool of one table.

    Rows are numbered from 1 as they are submitted (``submitted`` is the last
    number given); ``seqs`` holds the numbers of the buffered ``rows``, and
    ``in_flight_seqs`` those of the batch being written. Rows spooled at once
    (no room in the buffer) are on disk, so they are never pending.
    """

    def __init__(
        self,
        *,
        table: str,
        insert: Callable[[Sequence[_Row]], int],
        from_record: Callable[[Sequence[Any]], _Row],
        spool: _Spool,
    ) -> None:
        self.table = table
        self.insert: Callable[[Sequence[_Row]], int] = insert
        self.from_record: Callable[[Sequence[Any]], _Row] = from_record
        self.spool = spool
        self.rows: deque[_Row] = deque()
        self.seqs: deque[int] = deque()
        self.in_flight: list[_Row] = []
        self.in_flight_seqs: list[int] = []
        # The batch being written is also in the spool (``spool_through``):
        # if its INSERT fails, it is not buffered again.
        self.in_flight_spooled = False
        self.submitted = 0

    def oldest_pending_seq(self) -> int | None:
        """Return the number of the oldest row only in memory, if any."""
        if self.in_flight_seqs and not self.in_flight_spooled:
            return self.in_flight_seqs[0]
        return self.seqs[0] if self.seqs else None

    def pending_rows(self) -> int:
        """Return how many rows are only in memory."""
        in_flight = 0 if self.in_flight_spooled else len(self.in_flight)
        return len(self.rows) + in_flight

    def take_batch(self, count: int) -> None:
        """Move up to ``count`` rows from the buffer to the batch in flight."""
        self.in_flight = [self.rows.popleft() for _ in range(count)]
        self.in_flight_seqs = [self.seqs.popleft() for _ in range(count)]
        self.in_flight_spooled = False

    def end_batch(self, *, requeue: bool) -> None:
        """Forget the batch in flight; ``requeue`` puts it back in the buffer."""
        if requeue and not self.in_flight_spooled:
            self.rows.extendleft(reversed(self.in_flight))
            self.seqs.extendleft(reversed(self.in_flight_seqs))
        self.in_flight = []
        self.in_flight_seqs = []
        self.in_flight_spooled = False

    def take_through(self, seq: int) -> list[_Row]:
        """Return the rows only in memory numbered up to ``seq``, for the spool.

        Buffered rows leave the buffer; a batch in flight stays in flight (its
        INSERT may still succeed) but is marked spooled.
        """
        taken: list[_Row] = []
        oldest = self.oldest_pending_seq()
        if oldest is None or oldest > seq:
            return taken
        if self.in_flight_seqs and not self.in_flight_spooled:
            taken.extend(self.in_flight)
            self.in_flight_spooled = True
        while self.seqs and self.seqs[0] <= seq:
            self.seqs.popleft()
            taken.append(self.rows.popleft())
        return taken


class StoreWriter:
    """Writes detector and aggregated event rows to a store from a thread.

    ``submit_*`` never block on the store (see the module docstring for where
    rows go when it is slow or down). ``start`` before submitting; ``stop``
    writes what is left, or spools it. A writer runs once: rows submitted after
    ``stop`` go straight to the spool.

    Metrics: ``backlog_rows`` (buffered, being written, and spooled),
    ``rows_submitted`` and ``rows_durable`` (stored or on disk),
    ``rows_written`` (rows the store inserted; rows it already held are not
    counted again), ``rows_spooled``, ``rows_failed``, and ``last_error`` (the
    last failure, ``None`` again after a batch is written). ``on_batch``, if
    set, is called from the writer thread after every batch the store took,
    with the table name, the rows and the seconds the INSERT took.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        spool_dir: Path = DEFAULT_SPOOL_DIR,
        max_buffer_rows: int = 50_000,
        batch_rows: int = 5000,
        flush_interval_ms: int = 250,
        retry_initial_ms: int = 100,
        retry_max_ms: int = 5000,
    ) -> None:
        """Prepare a writer; nothing runs before :meth:`start`.

        Args:
            store: where rows go.
            spool_dir: where rows wait on disk when the buffer is full.
            max_buffer_rows: most rows held in memory, over both tables.
            batch_rows: most rows in one INSERT; this many waiting rows also
                trigger a write before the interval ends.
            flush_interval_ms: longest a row waits in the buffer.
            retry_initial_ms: first wait after the store was unreachable.
            retry_max_ms: longest wait between attempts.
        """
        self.store = store
        self.max_buffer_rows = max_buffer_rows
        self.batch_rows = batch_rows
        self._flush_interval_s = flush_interval_ms / 1000
        self._retry_initial_s = retry_initial_ms / 1000
        self._retry_max_s = retry_max_ms / 1000

        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._halt = False
        self._leftovers_spooled = False
        self._flush_waiters = 0
        self._schema_ready = False
        self._healthy = True
        self._outage_started_s = 0.0
        self._batches_per_pass = max_buffer_rows // batch_rows + 1

        self._detector = _Lane(
            table="detector_events",
            insert=store.insert_detector_events,
            from_record=DetectorEventRow.from_record,
            spool=_Spool(spool_dir, "detector_events"),
        )
        self._aggregated = _Lane(
            table="aggregated_events",
            insert=store.insert_aggregated_events,
            from_record=AggregatedEventRow.from_record,
            spool=_Spool(spool_dir, "aggregated_events"),
        )
        self._lanes: tuple[_Lane[Any], ...] = (self._detector, self._aggregated)

        self.rows_written = 0
        self.rows_spooled = 0
        self.rows_failed = 0
        self.last_error: str | None = None
        self.on_batch: Callable[[str, int, float], None] | None = None

    @property
    def backlog_rows(self) -> int:
        """Return the rows not stored yet: buffered, being written and spooled."""
        with self._cond:
            return self._buffered_rows() + sum(lane.spool.rows for lane in self._lanes)

    def start(self) -> None:
        """Start the background thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name="store-writer", daemon=True
        )
        self._thread.start()
        logger.info(
            "store writer started: batch_rows=%d max_buffer_rows=%d spooled_rows=%d",
            self.batch_rows,
            self.max_buffer_rows,
            sum(lane.spool.rows for lane in self._lanes),
        )

    def submit_detector(self, rows: Iterable[DetectorEventRow]) -> None:
        """Queue detector event rows; returns at once.

        Raises:
            StoreError: the buffer is full and the spool cannot be written.
        """
        self._submit(self._detector, list(rows))

    def submit_aggregated(self, rows: Iterable[AggregatedEventRow]) -> None:
        """Queue aggregated event rows; returns at once.

        Raises:
            StoreError: the buffer is full and the spool cannot be written.
        """
        self._submit(self._aggregated, list(rows))

    def flush(self, timeout_s: float) -> bool:
        """Wait until every row is stored (spooled ones too), at most ``timeout_s``.

        Returns whether the backlog is empty; at once if the thread is not running.
        """
        with self._cond:
            if not self._running():
                return self._drained()
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(self._drained, timeout=timeout_s)
            finally:
                self._flush_waiters -= 1

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is left, at most ``timeout_s``; spool the rest; end the thread.

        Steps:
        1. Ask the thread to write everything and wait for it (``timeout_s``).
        2. End the thread (it may still hang in one store call: it is a daemon).
        3. Spool the rows still in memory, so the next process writes them.
        """
        # Step 1.
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)

        # Step 2.
        with self._cond:
            self._halt = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)

        # Step 3.
        self._spool_leftovers()
        logger.info(
            "store writer stopped: rows_written=%d rows_spooled=%d backlog_rows=%d",
            self.rows_written,
            self.rows_spooled,
            self.backlog_rows,
        )

    def _submit(self, lane: _Lane[_Row], rows: list[_Row]) -> None:
        """Buffer what fits and spool the rest, numbering every row.

        The overflow is spooled before the lock is released, so that a
        durability check never sees a row that is neither buffered nor on disk.
        """
        with self._cond:
            # After stop nothing writes the buffer: every row goes to the spool.
            room = 0 if self._halt else self.max_buffer_rows - self._memory_rows()
            room = max(0, room)
            first_seq = lane.submitted + 1
            lane.submitted += len(rows)
            lane.rows.extend(rows[:room])
            lane.seqs.extend(range(first_seq, first_seq + min(room, len(rows))))
            overflow = rows[room:]
            if overflow:
                self._spool(lane, overflow)
            if self._buffered_rows() >= self.batch_rows:
                self._cond.notify_all()

        if overflow:
            logger.warning(
                "rows spooled to disk: table=%s rows=%d reason=%s",
                lane.table,
                len(overflow),
                "stopped" if self._halt else "buffer_full",
            )

    @property
    def rows_submitted(self) -> int:
        """Return how many rows were handed to the writer, over both tables."""
        with self._cond:
            return sum(lane.submitted for lane in self._lanes)

    @property
    def rows_durable(self) -> int:
        """Return how many submitted rows are stored or on disk."""
        with self._cond:
            pending = sum(lane.pending_rows() for lane in self._lanes)
            return sum(lane.submitted for lane in self._lanes) - pending

    def submitted_mark(self) -> DurableMark:
        """Return a mark naming every row submitted so far."""
        with self._cond:
            return tuple(lane.submitted for lane in self._lanes)

    def is_durable(self, mark: DurableMark) -> bool:
        """Return whether every row up to ``mark`` is stored or on disk."""
        with self._cond:
            return self._durable(mark)

    def wait_durable(self, mark: DurableMark, timeout_s: float) -> bool:
        """Write at once and wait until every row up to ``mark`` is durable.

        Rows submitted after the mark are not waited for. Returns whether
        they are durable within ``timeout_s``; blocks: call from a thread.
        """
        with self._cond:
            if self._durable(mark) or not self._running():
                return self._durable(mark)
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(
                    lambda: self._durable(mark), timeout=timeout_s
                )
            finally:
                self._flush_waiters -= 1

    def spool_through(self, mark: DurableMark) -> int:
        """Spool every row up to ``mark`` still in memory; return how many.

        A batch being written is spooled whole, and stays in flight: if its
        INSERT succeeds too, writing the spool back skips its rows.

        Raises:
            StoreError: the spool cannot be written.
        """
        spooled = 0
        with self._cond:
            for lane, seq in zip(self._lanes, mark, strict=True):
                rows = lane.take_through(seq)
                if rows:
                    self._spool(lane, rows)
                    spooled += len(rows)
            self._cond.notify_all()
        return spooled

    def _durable(self, mark: DurableMark) -> bool:
        for lane, seq in zip(self._lanes, mark, strict=True):
            oldest = lane.oldest_pending_seq()
            if oldest is not None and oldest <= seq:
                return False
        return True

    def _running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._halt

    def _buffered_rows(self) -> int:
        """Return the rows only in memory (a spooled batch in flight is on disk)."""
        return sum(lane.pending_rows() for lane in self._lanes)

    def _memory_rows(self) -> int:
        return sum(len(lane.rows) + len(lane.in_flight) for lane in self._lanes)

    def _drained(self) -> bool:
        return self._buffered_rows() == 0 and all(
            lane.spool.rows == 0 for lane in self._lanes
        )

    def _has_urgent_work(self) -> bool:
        return (
            self._halt
            or self._flush_waiters > 0
            or self._buffered_rows() >= self.batch_rows
            or (self._healthy and any(lane.spool.rows for lane in self._lanes))
        )

    def _run(self) -> None:
        """Write batches until stopped; back off while the store is unreachable."""
        backoff_s = 0.0
        while True:
            with self._cond:
                if backoff_s:
                    self._cond.wait_for(lambda: self._halt, timeout=backoff_s)
                else:
                    self._cond.wait_for(
                        self._has_urgent_work, timeout=self._flush_interval_s
                    )
                if self._halt:
                    break

            healthy = self._write_pass_guarded()
            self._note_health(healthy)
            backoff_s = 0.0 if healthy else self._next_backoff(backoff_s)
            with self._cond:
                self._cond.notify_all()

        for lane in self._lanes:
            lane.spool.close()

    def _note_health(self, healthy: bool) -> None:
        """Log when the store goes away and when it is back (not every retry)."""
        if healthy and not self._healthy:
            logger.info(
                "store reachable again: outage_s=%.1f backlog_rows=%d",
                time.monotonic() - self._outage_started_s,
                self.backlog_rows,
            )
        elif not healthy and self._healthy:
            self._outage_started_s = time.monotonic()
            logger.warning(
                "store write failed, retrying with backoff: error=%s", self.last_error
            )
        self._healthy = healthy

    def _next_backoff(self, backoff_s: float) -> float:
        return min(self._retry_max_s, max(self._retry_initial_s, backoff_s * 2))

    def _write_pass_guarded(self) -> bool:
        """Run one pass; a bug in it is logged and retried, never ends the thread."""
        try:
            return self._write_pass()
        except Exception as exc:
            self.last_error = repr(exc)
            logger.exception("store writer pass failed: error=%r", exc)
            return False

    def _write_pass(self) -> bool:
        """Write the buffers, then one spooled batch per table; False on an outage.

        A pass writes at most one buffer's worth per table, so that a table
        that is fed faster than it is written does not starve the other.
        """
        try:
            self._ensure_schema()
            for lane in self._lanes:
                for _ in range(self._batches_per_pass):
                    if not self._write_buffered(lane):
                        break
            for lane in self._lanes:
                self._write_spooled(lane)
        except StoreError as exc:
            self.last_error = str(exc)
            return False
        return True

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            self.store.ensure_schema()
            self._schema_ready = True

    def _write_buffered(self, lane: _Lane[_Row]) -> bool:
        """Write one batch from the buffer; return whether there was one.

        Raises:
            StoreError: the store is unreachable; the batch is buffered again.
        """
        with self._cond:
            lane.take_batch(min(len(lane.rows), self.batch_rows))
            batch = lane.in_flight
        if not batch:
            return False

        try:
            self._insert(lane, batch)
        except StoreUnavailable:
            with self._cond:
                # Once stop has spooled the leftovers, these rows are among them.
                lane.end_batch(requeue=not self._leftovers_spooled)
            raise

        with self._cond:
            lane.end_batch(requeue=False)
            self._cond.notify_all()
        return True

    def _write_spooled(self, lane: _Lane[_Row]) -> None:
        """Write one batch back from the spool, after the buffer's batches.

        Raises:
            StoreError: the store is unreachable; the batch is read again later.
        """
        if not lane.spool.rows:
            return

        records, lines = lane.spool.next_batch(self.batch_rows)
        if not lines:
            lane.spool.recount()
            return

        rows = self._rows_from_records(lane, records)
        try:
            self._insert(lane, rows)
        except StoreUnavailable:
            lane.spool.rewind()
            raise
        lane.spool.commit()

    def _rows_from_records(self, lane: _Lane[_Row], records: list[Any]) -> list[_Row]:
        rows: list[_Row] = []
        for record in records:
            try:
                rows.append(lane.from_record(record))
            except (TypeError, ValueError):
                logger.error(
                    "unreadable spool record: table=%s record=%r", lane.table, record
                )
                lane.spool.append_failed([record])
                self.rows_failed += 1
        return rows

    def _insert(self, lane: _Lane[_Row], rows: Sequence[_Row]) -> None:
        """Insert one batch; a refused batch is kept in the failed file.

        Raises:
            StoreUnavailable: the store is unreachable.
        """
        if not rows:
            return

        started_s = time.perf_counter()
        try:
            inserted = lane.insert(rows)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            lane.spool.append_failed([row.record() for row in rows])
            self.rows_failed += len(rows)
            self.last_error = str(exc)
            logger.error(
                "store refused a batch, kept for an operator: table=%s rows=%d "
                "path=%s error=%s",
                lane.table,
                len(rows),
                lane.spool.failed_path,
                exc,
            )
            return

        self.rows_written += inserted
        self.last_error = None
        if self.on_batch is not None:
            self.on_batch(lane.table, len(rows), time.perf_counter() - started_s)

    def _spool(self, lane: _Lane[_Row], rows: Sequence[_Row]) -> None:
        lane.spool.append([row.record() for row in rows])
        with self._cond:
            self.rows_spooled += len(rows)

    def _spool_leftovers(self) -> None:
        for lane in self._lanes:
            with self._cond:
                self._leftovers_spooled = True
                rows = lane.take_through(lane.submitted)
                if rows:
                    self._spool(lane, rows)
            if rows:
                logger.warning(
                    "store writer stopped with rows unwritten, spooled: "
                    "table=%s rows=%d path=%s",
                    lane.table,
                    len(rows),
                    lane.spool.active_path,
                )


class StoreWriterService(Service):
    """Runs a :class:`StoreWriter` as a faust/mode service (add it as a dependency)."""

    def __init__(self, writer: StoreWriter, *, stop_timeout_s: float = 10.0) -> None:
        """Wrap ``writer``; it starts and stops with the service."""
        super().__init__()
        self.writer = writer
        self.stop_timeout_s = stop_timeout_s

    async def on_start(self) -> None:
        """Start the writer's thread."""
        self.writer.start()

    async def on_stop(self) -> None:
        """Write or spool what is left, off the event loop."""
        await asyncio.to_thread(self.writer.stop, self.stop_timeout_s)
