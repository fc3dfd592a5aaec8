"""Table state over the web port, answered by the worker that owns the key.

A table registers a :class:`TableQuery`: which faust table it reads (its
changelog partitions say who owns what), which partition a request's
parameters name, and how to answer from the local table. The web view
``GET /aggregator/tables/<name>/?...`` then answers on any worker: the owner
of the partition answers itself, any other worker forwards the request to the
owner's web port (faust's canonical URL) and returns its answer.

Faust's own ``app.table_route`` hashes the table key to find the partition;
our tables are partitioned by camera id instead (co-partitioned with the
camera-keyed topics, whatever their key), so the partition is computed by the
query and the owner is looked up in the assignor's table metadata.

Registering a table (e.g. in the module that declares it)::

    from aggregator_app.table_queries import TableQuery, table_queries

    table_queries.register(
        TableQuery(
            name="correlation",
            table=correlation_table,
            params=("camera_id", "object_id"),
            partition=lambda params: partition_for_camera(params["camera_id"]),
            answer=lambda params: {"object": ...},
            help="Correlated objects of a camera.",
        )
    )
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from faust.types import TP, AppT, CollectionT
from yarl import URL

from aggregator_app.exceptions import ConfigError, InvalidQuery

__all__ = [
    "ROUTED_HEADER",
    "Answer",
    "Params",
    "TableQueries",
    "TableQuery",
    "answer_locally",
    "owner_of",
    "route",
    "table_queries",
]

logger = logging.getLogger(__name__)

#: Header of a request forwarded to the owner: the forwarding worker's URL.
#: The owner answers it itself, never forwards it again.
ROUTED_HEADER = "x-aggregator-routed-from"

Params = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class TableQuery:
    """How to answer for one table.

    Attributes:
        name: the path segment, ``/aggregator/tables/<name>/``.
        table: the faust table read (for a windowed table, its ``.table``).
        params: the query parameters it takes, for the index page.
        partition: the partition that holds the answer; raises
            :class:`~aggregator_app.exceptions.InvalidQuery` for bad params.
        answer: the JSON-ready answer from the local table (may be async);
            raises ``InvalidQuery`` for bad params.
        help: one line for the index page.
    """

    name: str
    table: CollectionT
    params: tuple[str, ...]
    partition: Callable[[Params], int]
    answer: Callable[[Params], Any | Awaitable[Any]]
    help: str

    @property
    def changelog_topic(self) -> str:
        """Return the name of the table's changelog topic."""
        return str(self.table.changelog_topic.get_topic_name())


@dataclass(frozen=True, slots=True)
class Answer:
    """What a worker answers: who served it, and the JSON body or an error."""

    status: int
    body: dict[str, Any]


class TableQueries:
    """The tables that can be queried, by name."""

    def __init__(self) -> None:
        self._queries: dict[str, TableQuery] = {}

    def register(self, query: TableQuery) -> TableQuery:
        """Add a table; a name registered twice is a ``ConfigError``."""
        if not query.name.isidentifier():
            raise ConfigError(f"table query name must be an identifier: {query.name!r}")
        if query.name in self._queries:
            raise ConfigError(f"table query registered twice: {query.name!r}")
        self._queries[query.name] = query
        return query

    def get(self, name: str) -> TableQuery | None:
        """Return the query of a table, if registered."""
        return self._queries.get(name)

    def __iter__(self) -> Iterator[TableQuery]:
        return iter(self._queries.values())


table_queries = TableQueries()


def owner_of(app: AppT, tp: TP) -> URL | None:
    """Return the web URL of the worker that holds ``tp`` of a changelog, if known."""
    for url, topics in app.assignor.table_metadata(tp.topic).items():
        if tp.partition in topics.get(tp.topic, ()):
            return URL(url)
    return None


def _same_node(app: AppT, url: URL) -> bool:
    own = URL(str(app.conf.canonical_url))
    return (url.host, url.port) == (own.host, own.port)


async def answer_locally(query: TableQuery, params: Params) -> Any:
    """Return the local answer of ``query`` (awaited if it is a coroutine)."""
    result = query.answer(params)
    if inspect.isawaitable(result):
        result = await result
    return result


async def route(
    app: AppT,
    query: TableQuery,
    params: Params,
    *,
    path_qs: str,
    headers: Mapping[str, str],
    timeout_s: float = 5.0,
) -> Answer:
    """Answer ``query`` here if this worker owns its partition, else ask the owner.

    1. Find the partition the parameters name, and the worker holding it.
    2. This worker: answer locally. A request already forwarded once is
       never forwarded again: 503 if this worker does not hold the partition.
    3. Otherwise forward the request (path, query, headers) and relay the answer.
    """
    # Step 1.
    try:
        partition = query.partition(params)
    except InvalidQuery as exc:
        return Answer(exc.status, {"error": str(exc)})
    tp = TP(query.changelog_topic, partition)
    owner = owner_of(app, tp)
    own_url = str(app.conf.canonical_url)

    # Step 2.
    if owner is None or _same_node(app, owner):
        return await _local_answer(query, params, partition=partition, own_url=own_url)
    if ROUTED_HEADER in headers:
        # Forwarded here, but the partition has moved on (a rebalance), or
        # the header was sent by hand: an empty answer would look like state.
        return Answer(
            503,
            {
                "error": "this worker does not hold the partition; retry",
                "partition": partition,
                "owner": str(owner),
            },
        )

    # Step 3.
    return await _forward(
        app, owner, path_qs=path_qs, headers=headers, timeout_s=timeout_s
    )


async def _local_answer(
    query: TableQuery, params: Params, *, partition: int, own_url: str
) -> Answer:
    try:
        result = await answer_locally(query, params)
    except InvalidQuery as exc:
        return Answer(exc.status, {"error": str(exc)})
    body = {
        "table": query.name,
        "partition": partition,
        "served_by": own_url,
        "result": result,
    }
    return Answer(200, body)


async def _forward(
    app: AppT,
    owner: URL,
    *,
    path_qs: str,
    headers: Mapping[str, str],
    timeout_s: float,
) -> Answer:
    forwarded = {
        name: value
        for name, value in headers.items()
        if name.lower() not in ("host", "content-length")
    }
    forwarded[ROUTED_HEADER] = str(app.conf.canonical_url)
    url = str(owner.with_path("/")).rstrip("/") + path_qs
    try:
        async with app.http_client.get(
            url, headers=forwarded, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            body = await response.json(content_type=None)
            return Answer(response.status, body)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        logger.warning("table query: owner did not answer: url=%s error=%r", url, exc)
        return Answer(
            503, {"error": f"the worker owning the key did not answer: {owner}"}
        )
