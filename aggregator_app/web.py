"""Views on the Faust web port: counters, table state, health and metrics.

``GET /aggregator/counts/``
    This worker's counters (received, accepted, rejected by reason, kept,
    repeats, redeliveries, published) and the store writer's backlog.
``GET /aggregator/summary/``
    The counters plus the rows in the event store, for the demo job.
``GET /aggregator/tables/``
    The tables that can be queried, with their parameters.
``GET /aggregator/tables/<name>/?<params>``
    The state of a table for a key, from the worker that owns the key: any
    worker answers (see :mod:`aggregator_app.table_queries`). ``dedup`` takes
    ``key`` (a dedup key, ``<camera>|<detector>|...``), ``time_ms`` (an event
    time) and optionally ``camera_id`` (default: the key up to its first
    ``|``), and returns the spans of that key in the windows around the time.
``GET /aggregator/dedup/?key=<dedup key>&time_ms=<event time>``
    The same as ``/aggregator/tables/dedup/``, under its first address.
``GET /aggregator/metrics/``
    Counters, gauges (store backlog, consumer lag per partition) and latency
    histograms per stage, in Prometheus' text format.
``GET /aggregator/health/`` (also ``/aggregator/health/ready/``)
    200 when this worker holds partitions, reaches Kafka, its store writes
    and its consumer lag is under ``AGGREGATOR_READY_MAX_LAG``; else 503.
    Body: ``{"status": "ok" | "degraded", "problems": [...]}``.
``GET /aggregator/health/live/``
    200 while the worker runs and has not crashed, else 503.

Live streams and the dashboard: :mod:`aggregator_app.live.views`. Who may
call what (token, CORS): :mod:`aggregator_app.access`, applied to every
request by a middleware installed here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from faust.web import Request, Response, View

from agents.correlate import correlator
from agents.dedup import in_flight
from agents.episodes import fuser
from aggregator_app import sink
from aggregator_app.access import access_middleware
from aggregator_app.app import app, rules, settings
from aggregator_app.exceptions import InvalidQuery, StoreError
from aggregator_app.health import consumer_lag, readiness
from aggregator_app.live.streams import hubs
from aggregator_app.live.views import access
from aggregator_app.metrics import (
    LabelledGauge,
    counters,
    latency,
    prometheus_text,
)
from aggregator_app.table_queries import (
    Params,
    TableQuery,
    route,
    table_queries,
)
from aggregator_app.topics import (
    partition_for_camera,
    partition_for_site,
)
from tables.correlation import correlation_table
from tables.dedup import TableSpanStore, dedup_table
from tables.episodes import episode_table

__all__ = [
    "CountsView",
    "DedupView",
    "HealthView",
    "LiveView",
    "MetricsView",
    "ReadyView",
    "SummaryView",
    "TableIndexView",
    "TableView",
]

blueprint_prefix = "/aggregator"

_MAX_KEY_CHARS = 1024
_WRITER_TOTALS = {
    "rows_submitted": "Rows handed to the store writer.",
    "rows_durable": "Rows stored or spooled to disk.",
    "rows_written": "Rows the store inserted.",
    "rows_spooled": "Rows spooled to disk (buffer full, store down, commit wait).",
    "rows_failed": "Rows the store refused, kept for an operator.",
}
_STREAM_TOTALS = {
    "stream_clients_connected": "Live-stream clients connected, since start.",
    "stream_clients_dropped": "Live-stream clients dropped as too slow.",
    "stream_events_sent": "Events queued for live-stream clients.",
}

# The aiohttp driver's application; its middlewares run before every view.
_web_app = app.web.web_app  # type: ignore[attr-defined]  # faust's base Web lacks it
_web_app.middlewares.append(access_middleware(access))


# Counters.


@app.page(f"{blueprint_prefix}/counts/")
class CountsView(View):
    """This worker's counters."""

    async def get(self, request: Request) -> Response:
        return self.json(_counts())


@app.page(f"{blueprint_prefix}/summary/")
class SummaryView(View):
    """Counters and stored rows, as the demo job prints them."""

    async def get(self, request: Request) -> Response:
        try:
            stored = await asyncio.to_thread(sink.stored_counts)
        except StoreError as exc:
            # The counters still answer while the store is down.
            return self.json({"counts": _counts(), "stored": {}, "error": str(exc)})
        return self.json({"counts": _counts(), "stored": stored})


def _counts() -> dict[str, Any]:
    data = counters.as_dict()
    data["store_backlog_rows"] = sink.backlog_rows()
    data["in_flight_records"] = in_flight.records
    data["episode_objects_open"] = fuser.open_objects
    data["assigned_partitions"] = len(app.assignor.assigned_actives())
    data["stream_clients"] = sum(len(hub.subscribers) for hub in hubs.values())
    data["stream_clients_dropped"] = sum(
        hub.stats.clients_dropped for hub in hubs.values()
    )
    return data


# Table state.


def _dedup_partition(params: Params) -> int:
    key = params.get("key", "")
    if not 0 < len(key) <= _MAX_KEY_CHARS:
        raise InvalidQuery(f"key must be 1..{_MAX_KEY_CHARS} characters")
    key_camera_id = key.split("|", 1)[0]
    camera_id = params.get("camera_id") or key_camera_id
    if camera_id != key_camera_id:
        raise InvalidQuery("camera_id must be the camera the key starts with")
    return partition_for_camera(camera_id)


def _dedup_answer(params: Params) -> dict[str, Any]:
    """Return the spans of a dedup key in the windows around an event time."""
    key = params["key"]
    time_text = params.get("time_ms", "")
    if not time_text.isdigit() or len(time_text) > 15:
        raise InvalidQuery("time_ms must be epoch milliseconds (digits)")
    time_ms = int(time_text)

    window_ms = int(rules.dedup.window_s * 1000)
    first_ms = time_ms - time_ms % window_ms - window_ms
    spans_store = TableSpanStore(dedup_table)
    windows = []
    for start_ms in (first_ms, first_ms + window_ms, first_ms + 2 * window_ms):
        if start_ms < 0:
            continue
        spans = spans_store.get((key, start_ms)) or []
        windows.append(
            {"start_ms": start_ms, "spans": [span.to_json() for span in spans]}
        )
    return {"key": key, "time_ms": time_ms, "windows": windows}


table_queries.register(
    TableQuery(
        name="dedup",
        table=dedup_table.table,
        params=("key", "time_ms", "camera_id"),
        partition=_dedup_partition,
        answer=_dedup_answer,
        help="Dedup spans of a key in the windows around an event time.",
    )
)


_MAX_ID_CHARS = 512


def _required(params: Params, name: str) -> str:
    value = params.get(name, "")
    if not 0 < len(value) <= _MAX_ID_CHARS:
        raise InvalidQuery(f"{name} must be 1..{_MAX_ID_CHARS} characters")
    return value


def _correlation_answer(params: Params) -> dict[str, Any]:
    """Return a site's correlation state: watermarks, tracks, pending events."""
    site_id = _required(params, "site_id")
    state = correlator.sites.get(site_id)
    if state is None:
        return {"site_id": site_id, "known": False}
    global_id = params.get("global_id")
    tracks = {
        key: track.to_json()
        for key, track in state.tracks.items()
        if global_id is None or key == global_id
    }
    return {
        "site_id": site_id,
        "known": True,
        "watermark_ms": state.watermark_ms,
        "camera_watermark_ms": dict(state.camera_watermark_ms),
        "pending_events": len(state.pending),
        "tracks": tracks,
    }


def _episode_partition(params: Params) -> int:
    global_id = _required(params, "global_id")
    site_id, _, rest = global_id.partition(":")
    if not rest:
        raise InvalidQuery("global_id must be <site id>:<id>, as correlation makes it")
    return partition_for_site(site_id)


def _episode_answer(params: Params) -> dict[str, Any]:
    """Return what is held of a global object's episode, not yet emitted."""
    global_id = params["global_id"]
    site_id = global_id.partition(":")[0]
    observations = fuser.held(global_id)
    return {
        "global_id": global_id,
        "site_watermark_ms": fuser.watermark_ms(site_id),
        "observations": [observation.to_json() for observation in observations],
    }


table_queries.register(
    TableQuery(
        name="correlation",
        table=correlation_table,
        params=("site_id", "global_id"),
        partition=lambda params: partition_for_site(_required(params, "site_id")),
        answer=_correlation_answer,
        help="A site's correlation state: watermarks and tracks (one global_id).",
    )
)
table_queries.register(
    TableQuery(
        name="episodes",
        table=episode_table,
        params=("global_id",),
        partition=_episode_partition,
        answer=_episode_answer,
        help="Observations of a global object held for its episode, not yet emitted.",
    )
)


async def _table_response(view: View, request: Request, name: str) -> Response:
    query = table_queries.get(name)
    if query is None:
        return view.error(404, f"no such table: {name}")
    # A multidict: a key given twice is listed twice among its items.
    given = Counter(name for name, _value in request.query.items())
    repeated = sorted(key for key, times in given.items() if times > 1)
    if repeated:
        return view.error(400, f"parameters given more than once: {repeated}")
    params = {key: value for key, value in request.query.items()}
    answer = await route(
        app,
        query,
        params,
        path_qs=str(request.rel_url),
        headers={name.lower(): value for name, value in request.headers.items()},
    )
    return view.json(answer.body, status=answer.status)


@app.page(f"{blueprint_prefix}/tables/")
class TableIndexView(View):
    """The tables that can be queried."""

    async def get(self, request: Request) -> Response:
        return self.json(
            {
                query.name: {"params": list(query.params), "help": query.help}
                for query in table_queries
            }
        )


@app.page(f"{blueprint_prefix}/tables/{{name}}/")
class TableView(View):
    """The state of one table for a key, from the worker that owns it."""

    async def get(self, request: Request, name: str) -> Response:
        return await _table_response(self, request, name)


@app.page(f"{blueprint_prefix}/dedup/")
class DedupView(View):
    """The dedup table's spans for a key (``/aggregator/tables/dedup/``)."""

    async def get(self, request: Request) -> Response:
        return await _table_response(self, request, "dedup")


# Metrics and health.


@app.page(f"{blueprint_prefix}/metrics/")
class MetricsView(View):
    """Counters, gauges and histograms for Prometheus."""

    async def get(self, request: Request) -> Response:
        lag = await consumer_lag(app)
        gauges = {
            "store_backlog_rows": float(sink.backlog_rows()),
            "in_flight_records": float(in_flight.records),
            "assigned_partitions": float(len(app.assignor.assigned_actives())),
            "consumer_lag_records": float(sum(lag.values())),
        }
        stats = sink.writer_stats()
        totals = {
            f"store_{name}": (help_text, float(stats[name]))
            for name, help_text in _WRITER_TOTALS.items()
        }
        gauges["stream_clients"] = float(
            sum(len(hub.subscribers) for hub in hubs.values())
        )
        totals.update(_stream_totals())
        per_partition = LabelledGauge(
            name="consumer_lag_by_partition",
            help="Records not committed yet, per partition consumed.",
            values={
                (("topic", tp.topic), ("partition", str(tp.partition))): float(n)
                for tp, n in lag.items()
            },
        )
        text = prometheus_text(
            counters,
            gauges,
            totals=totals,
            labelled=[per_partition],
            histograms=latency,
        )
        return self.text(text, content_type="text/plain; version=0.0.4")


def _stream_totals() -> dict[str, tuple[str, float]]:
    stats = [hub.stats for hub in hubs.values()]
    values = {
        "stream_clients_connected": sum(s.clients_total for s in stats),
        "stream_clients_dropped": sum(s.clients_dropped for s in stats),
        "stream_events_sent": sum(s.items_sent for s in stats),
    }
    return {
        name: (help_text, float(values[name]))
        for name, help_text in _STREAM_TOTALS.items()
    }


async def _ready_response(view: View) -> Response:
    state = await readiness(
        app, store_error=sink.last_error(), max_lag=settings.ready_max_lag
    )
    body = {
        "status": "ok" if state.ready else "degraded",
        "problems": list(state.problems),
    }
    return view.json(body, status=200 if state.ready else 503)


@app.page(f"{blueprint_prefix}/health/")
class HealthView(View):
    """Whether this worker is doing its work (readiness)."""

    async def get(self, request: Request) -> Response:
        return await _ready_response(self)


@app.page(f"{blueprint_prefix}/health/ready/")
class ReadyView(View):
    """Readiness, under the name probes expect."""

    async def get(self, request: Request) -> Response:
        return await _ready_response(self)


@app.page(f"{blueprint_prefix}/health/live/")
class LiveView(View):
    """Liveness: the worker runs, its event loop answers, it has not crashed."""

    async def get(self, request: Request) -> Response:
        if app.crashed or app.should_stop:
            return self.json({"status": "down"}, status=503)
        return self.json({"status": "live"})
