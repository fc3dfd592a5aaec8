"""The event store on a ClickHouse server, over the native protocol.

Uses ``clickhouse-driver``; works with servers from 18.16 on. One connection,
used by one thread at a time (the driver's client is not thread-safe); the
driver reconnects by itself on the next call after a failure.

Driver errors are mapped to ours in :func:`_mapped_errors`, and only there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from clickhouse_driver import Client
from clickhouse_driver import errors as driver_errors

from aggregator_app.exceptions import StoreError, StoreUnavailable
from aggregator_app.store.base import (
    DEFAULT_DATABASE,
    DEFAULT_TTL_DAYS,
    ClickHouseStore,
    store_error_for_code,
)
from aggregator_app.store.schema import TableSpec

__all__ = ["DEFAULT_NATIVE_PORT", "NativeStore"]

logger = logging.getLogger(__name__)

DEFAULT_NATIVE_PORT = 9000

_NETWORK_ERRORS = (
    driver_errors.NetworkError,
    driver_errors.SocketTimeoutError,
    EOFError,
    OSError,
)


class NativeStore(ClickHouseStore):
    """The event store on a ClickHouse server (native protocol, port 9000)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_NATIVE_PORT,
        database: str = DEFAULT_DATABASE,
        user: str = "default",
        password: str = "",
        connect_timeout_s: float = 2.0,
        send_receive_timeout_s: float = 30.0,
        ttl_days: int | None = DEFAULT_TTL_DAYS,
    ) -> None:
        """Prepare a store; nothing connects before the first call.

        Args:
            host: the server's host.
            port: its native protocol port.
            database: the database of the tables (created by ``ensure_schema``).
            user: the user to log in as.
            password: that user's password.
            connect_timeout_s: how long to wait for a connection.
            send_receive_timeout_s: how long to wait on a busy socket.
            ttl_days: days kept by table TTL on servers that have it.
        """
        super().__init__(database=database, ttl_days=ttl_days)
        self.address = f"{host}:{port}"
        self._lock = threading.Lock()
        # The session database is "default", which always exists; every
        # statement names its table with the database.
        self._client = Client(
            host=host,
            port=port,
            database="default",
            user=user,
            password=password,
            connect_timeout=connect_timeout_s,
            send_receive_timeout=send_receive_timeout_s,
            sync_request_timeout=send_receive_timeout_s,
            client_name="event-aggregator",
        )

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._client.disconnect()

    def _execute(self, sql: str) -> None:
        with self._lock, self._mapped_errors():
            self._client.execute(sql)

    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        with self._lock, self._mapped_errors():
            rows: list[tuple[Any, ...]] = self._client.execute(sql)
        return rows

    def _insert(self, spec: TableSpec, records: list[tuple[Any, ...]]) -> None:
        columns = ", ".join(spec.column_names)
        sql = f"INSERT INTO {self._table(spec)} ({columns}) VALUES"
        with self._lock, self._mapped_errors():
            self._client.execute(sql, records)

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        """Raise driver and socket errors as :class:`StoreError` (the one place)."""
        try:
            yield
        except _NETWORK_ERRORS as exc:
            self._client.disconnect()
            raise StoreUnavailable(
                f"ClickHouse unreachable: address={self.address} error={exc}"
            ) from exc
        except driver_errors.ServerException as exc:
            # Old servers append their stack trace to the message: keep the message.
            message = exc.message.split("Stack trace:", 1)[0].strip()
            raise store_error_for_code(
                exc.code, f"ClickHouse error: code={exc.code} {message}"
            ) from exc
        except driver_errors.Error as exc:
            self._client.disconnect()
            raise StoreError(f"ClickHouse driver: {exc}") from exc
