"""Views on the Faust web port: what this worker counted, and its dedup state.

``GET /aggregator/counts/``
    This worker's counters (received, accepted, rejected by reason, kept,
    repeats, redeliveries, published) and the store writer's backlog.
``GET /aggregator/summary/``
    The counters plus the rows in the event store, for the demo job.
``GET /aggregator/dedup/?key=<dedup key>&time_ms=<event time>``
    The spans this worker holds for a dedup key around an event time.
``GET /aggregator/metrics/``
    The counters and gauges in Prometheus' text format.
``GET /aggregator/health/``
    200 when this worker holds partitions and its store writes, else 503,
    with the reasons in JSON.

TODO: route table queries to the worker that owns the key (faust's
``table_route``) so any worker answers for any key; until then a query
answers from the local worker only and says so in ``"scope"``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.web import Request, Response, View

from aggregator_app import sink
from aggregator_app.app import app
from aggregator_app.metrics import counters, prometheus_text

__all__ = ["CountsView", "DedupView", "HealthView", "MetricsView", "SummaryView"]

blueprint_prefix = "/aggregator"


@app.page(f"{blueprint_prefix}/counts/")
class CountsView(View):
    """This worker's counters."""

    async def get(self, request: Request) -> Response:
        return self.json(_counts())


@app.page(f"{blueprint_prefix}/summary/")
class SummaryView(View):
    """Counters and stored rows, as the demo job prints them."""

    async def get(self, request: Request) -> Response:
        stored = await asyncio.to_thread(sink.stored_counts)
        return self.json({"counts": _counts(), "stored": stored})


@app.page(f"{blueprint_prefix}/dedup/")
class DedupView(View):
    """The spans kept for one dedup key around an event time."""

    async def get(self, request: Request) -> Response:
        from agents.dedup import deduplicator

        key = request.query.get("key", "")
        time_text = request.query.get("time_ms", "")
        if not key or len(key) > 1024 or not time_text.isdigit():
            return self.error(400, "give key (1..1024 chars) and time_ms (digits)")

        time_ms = int(time_text)
        spans = deduplicator.spans_near(key, time_ms)
        return self.json(
            {"scope": "local", "key": key, "spans": [span.to_json() for span in spans]}
        )


@app.page(f"{blueprint_prefix}/metrics/")
class MetricsView(View):
    """Counters and gauges for Prometheus."""

    async def get(self, request: Request) -> Response:
        gauges = {
            "store_backlog_rows": float(sink.backlog_rows()),
            "assigned_partitions": float(len(app.assignor.assigned_actives())),
        }
        return self.text(
            prometheus_text(counters, gauges),
            content_type="text/plain; version=0.0.4",
        )


@app.page(f"{blueprint_prefix}/health/")
class HealthView(View):
    """Whether this worker is doing its work."""

    async def get(self, request: Request) -> Response:
        problems = []
        if not app.assignor.assigned_actives():
            problems.append("no partitions assigned")
        store_error = sink.last_error()
        if store_error is not None:
            problems.append(f"store: {store_error}")
        status = 503 if problems else 200
        body = {"status": "ok" if not problems else "degraded", "problems": problems}
        return self.json(body, status=status)


def _counts() -> dict[str, Any]:
    data = counters.as_dict()
    data["store_backlog_rows"] = sink.backlog_rows()
    data["assigned_partitions"] = len(app.assignor.assigned_actives())
    return data
