"""The event store in embedded ClickHouse (chdb): in the process, in a directory.

The default when no server is configured. chdb runs one engine per process,
bound to one directory: every :class:`EmbeddedStore` on that directory shares
one connection (counted, closed with the last store), and its calls are
serialised by one lock. Asking for a second directory while the first is open
is a :class:`~aggregator_app.exceptions.StoreError`.

chdb errors are mapped to ours in :func:`_mapped_errors`, and only there.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chdb
import orjson

from aggregator_app.exceptions import StoreError
from aggregator_app.store.base import (
    DEFAULT_DATABASE,
    DEFAULT_TTL_DAYS,
    ClickHouseStore,
    store_error_for_code,
)
from aggregator_app.store.schema import TableSpec

__all__ = ["DEFAULT_EMBEDDED_DIR", "EmbeddedStore"]

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDED_DIR = Path(".var/chdb")

# Settings of our connection: 64-bit integers as JSON numbers, not strings.
_CONNECTION_SETTINGS = "output_format_json_quote_64bit_integers=0"
_ERROR_CODE = re.compile(r"Code: (\d+)")


@dataclass(slots=True)
class _Engine:
    """The process's chdb connection, with its directory and its users."""

    path: Path
    connection: Any  # chdb.state.sqlitelike.Connection, untyped
    lock: threading.Lock
    users: int = 0


_engine: _Engine | None = None
_engine_lock = threading.Lock()


def _acquire_engine(path: Path) -> _Engine:
    """Return the process's engine on ``path``, opening it for the first user."""
    global _engine
    with _engine_lock:
        if _engine is None:
            path.mkdir(parents=True, exist_ok=True)
            with _mapped_errors():
                connection = chdb.connect(f"{path}?{_CONNECTION_SETTINGS}")
            _engine = _Engine(path=path, connection=connection, lock=threading.Lock())
            logger.info("embedded ClickHouse opened: path=%s", path)
        elif _engine.path != path:
            raise StoreError(
                "chdb holds one directory per process: "
                f"open={_engine.path} asked={path}"
            )

        _engine.users += 1
        return _engine


def _release_engine(engine: _Engine) -> None:
    """Drop one user of ``engine``; the last one closes the connection."""
    global _engine
    with _engine_lock:
        engine.users -= 1
        if engine.users > 0:
            return

        with engine.lock:
            engine.connection.close()
        _engine = None
        logger.info("embedded ClickHouse closed: path=%s", engine.path)


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """Raise chdb errors as :class:`StoreError` (the one place).

    chdb raises ``RuntimeError`` subclasses (``chdb._exceptions.ChdbError``);
    the package also exports an unrelated ``chdb.ChdbError``, caught too.
    """
    try:
        yield
    except (RuntimeError, chdb.ChdbError) as exc:
        found = _ERROR_CODE.search(str(exc))
        code = int(found.group(1)) if found else None
        raise store_error_for_code(code, f"chdb: {exc}") from exc


class EmbeddedStore(ClickHouseStore):
    """The event store in embedded ClickHouse, kept in a directory on disk."""

    def __init__(
        self,
        path: Path | str = DEFAULT_EMBEDDED_DIR,
        *,
        database: str = DEFAULT_DATABASE,
        ttl_days: int | None = DEFAULT_TTL_DAYS,
    ) -> None:
        """Open (or share) the process's embedded engine on ``path``.

        Args:
            path: the directory of the data; created if missing.
            database: the database of the tables (created by ``ensure_schema``).
            ttl_days: days kept by table TTL (chdb has it); ``None`` keeps all.

        Raises:
            StoreError: chdb cannot open ``path``, or has another one open.
        """
        super().__init__(database=database, ttl_days=ttl_days)
        self.path = Path(path).resolve()
        self._engine: _Engine | None = _acquire_engine(self.path)

    def close(self) -> None:
        """Stop using the engine; the last store on it closes it."""
        engine, self._engine = self._engine, None
        if engine is not None:
            _release_engine(engine)

    def _execute(self, sql: str) -> None:
        engine = self._open_engine()
        with engine.lock, _mapped_errors():
            engine.connection.query(sql)

    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        engine = self._open_engine()
        with engine.lock, _mapped_errors():
            result = engine.connection.query(sql, "JSONCompact")
        return [tuple(row) for row in orjson.loads(result.bytes())["data"]]

    def _insert(self, spec: TableSpec, records: list[tuple[Any, ...]]) -> None:
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        columns = ", ".join(spec.column_names)
        sql = f"INSERT INTO {self._table(spec)} ({columns})"

        engine = self._open_engine()
        with engine.lock, _mapped_errors():
            with engine.connection.send_insert(sql, "JSONCompactEachRow") as inserter:
                inserter.append(data)
                inserter.finish()

    def _open_engine(self) -> _Engine:
        if self._engine is None:
            raise StoreError(f"embedded store is closed: path={self.path}")
        return self._engine
