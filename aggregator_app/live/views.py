"""Live streams over the web port: Server-Sent Events, WebSocket, the dashboard.

``GET /aggregator/stream/events/`` (SSE) and ``GET /aggregator/stream/ws/``
(WebSocket) take the filters of :mod:`aggregator_app.live.filters`,
``source=aggregated`` (default) or ``source=detector``, and a place to
resume from: the SSE ``Last-Event-ID`` header, or ``cursor=`` (both
endpoints). A stream opens with a ``ready`` message that carries the cursor
it starts at, then sends the records, each with the cursor after it:

- SSE: ``id: <cursor>`` and ``data: <the event JSON>``; control messages are
  ``event: ready``, ``event: gap`` and ``event: dropped``; an idle stream gets
  a ``: heartbeat`` comment every ``AGGREGATOR_STREAM_HEARTBEAT_MS``.
- WebSocket: text messages ``{"cursor": ..., "kind": "aggregated" |
  "detection", "event": {...}}`` and ``{"kind": "ready" | "gap" | "dropped",
  ...}``; the server pings at the heartbeat interval and closes a connection
  that does not answer.

A client whose queue fills (``AGGREGATOR_STREAM_QUEUE_EVENTS``) is dropped: it
gets a ``dropped`` message with the reason and the cursor of the last record
it was sent (if it reads within five seconds), then the connection
closes (WebSocket close code 4008).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any, Protocol, cast

from aiohttp import WSMsgType, web
from aiokafka.errors import KafkaError
from faust.web import Request, Response, View

from aggregator_app.access import cors_headers, load_access
from aggregator_app.app import app, settings
from aggregator_app.exceptions import InvalidQuery, StreamUnavailable
from aggregator_app.live.cursor import format_cursor, parse_cursor
from aggregator_app.live.filters import StreamFilter
from aggregator_app.live.hub import TOO_SLOW, Gap, Hub, Item, Subscriber
from aggregator_app.live.streams import hubs

__all__ = [
    "DROPPED_CLOSE_CODE",
    "DashboardView",
    "EventStreamView",
    "WebSocketStreamView",
    "access",
]

logger = logging.getLogger(__name__)

#: WebSocket close code of a client dropped as too slow (private range).
DROPPED_CLOSE_CODE = 4008
_FAREWELL_TIMEOUT_S = 5.0
_ABORT_AFTER_S = 10.0
_POLL_S = 0.5
_MAX_CLOSE_REASON_BYTES = 120  # a close frame's reason: at most 123
_START_TIMEOUT_S = 15.0
#: The kernel's send buffer of a stream connection. Left to autotuning it grows
#: to megabytes on a stalled connection, which then takes that long to notice;
#: 256 KiB still carries 2.5 MB/s over a 100 ms round trip.
_SEND_BUFFER_BYTES = 256 * 1024
_SSE_RETRY_MS = 2000
_DASHBOARD = Path(__file__).with_name("dashboard.html")

access = load_access(settings)


class _Connection(Protocol):
    """One client's transport: how to send an item, a notice, a heartbeat."""

    last_cursor: str | None

    @property
    def closed(self) -> bool: ...

    async def send(self, item: Item) -> None: ...

    async def send_all(self, items: list[Item]) -> None: ...

    async def notice(self, kind: str, body: dict[str, Any]) -> None: ...

    async def heartbeat(self) -> None: ...


def _open_stream(request: web.Request) -> tuple[Hub, StreamFilter, list[int] | None]:
    """Return the hub, filter and resume cursor a request asks for.

    Raises:
        InvalidQuery: a parameter cannot be used.
    """
    source = request.query.get("source", "aggregated")
    hub = hubs.get(source)
    if hub is None:
        raise InvalidQuery(f"source must be one of {', '.join(hubs)}, not {source!r}")
    stream_filter = StreamFilter.from_query(request.query)
    text = request.headers.get("Last-Event-ID") or request.query.get("cursor")
    cursor = None
    if text:
        cursor = parse_cursor(text, stream=hub.name, partitions=len(hub.tps))
    return hub, stream_filter, cursor


async def _start(hub: Hub) -> None:
    """Start the hub's reading; a broker that does not answer is a 503."""
    try:
        await asyncio.wait_for(hub.ensure_started(), _START_TIMEOUT_S)
    except (KafkaError, TimeoutError) as exc:
        logger.warning("live: stream not started: stream=%s error=%r", hub.name, exc)
        raise StreamUnavailable(f"the stream cannot be read now: {exc!r}") from exc


async def serve(
    connection: _Connection,
    hub: Hub,
    stream_filter: StreamFilter,
    cursor: list[int] | None,
) -> str | None:
    """Stream to one client until it leaves or is dropped; return why it was.

    1. Subscribe (the hub is started), so that every record from now on is
       queued for it.
    2. Send ``ready`` and, when resuming, the records from its cursor up to
       the subscription (the catch-up), then the queue, with heartbeats.
    3. If the hub dropped it, tell it why and where it got to.
    """
    # Step 1.
    await hub.ensure_started()  # again: it may have stopped, idle, since
    subscriber = hub.subscribe(
        stream_filter, queue_events=settings.stream_queue_events, cursor=cursor
    )
    stop = list(hub.positions)

    # Step 2.
    pump = asyncio.ensure_future(
        _pump(connection, hub, subscriber, start=cursor or stop, stop=stop)
    )
    subscriber.on_drop = lambda: _cancel(pump)
    try:
        await pump
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if subscriber.dropped_reason is None or (current and current.cancelling()):
            raise
    except (ConnectionError, RuntimeError) as exc:
        logger.debug("live: client left: error=%r", exc)
    finally:
        hub.remove(subscriber)

    # Step 3.
    if subscriber.dropped_reason is not None and not connection.closed:
        farewell = {
            "reason": subscriber.dropped_reason,
            "cursor": connection.last_cursor,
        }
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            await asyncio.wait_for(
                connection.notice("dropped", farewell), _FAREWELL_TIMEOUT_S
            )
    return subscriber.dropped_reason


async def _pump(
    connection: _Connection,
    hub: Hub,
    subscriber: Subscriber,
    *,
    start: list[int],
    stop: list[int],
) -> None:
    connection.last_cursor = format_cursor(hub.name, start)
    await connection.notice("ready", {"cursor": connection.last_cursor})

    catch_up = hub.catch_up(start=start, stop=stop, stream_filter=subscriber.filter)
    async with contextlib.aclosing(catch_up) as earlier:
        async for item in earlier:
            if isinstance(item, Gap):
                await connection.notice("gap", _gap_body(hub, item))
            else:
                await connection.send(item)

    # aiohttp does not cancel a handler whose client left; an idle stream
    # looks at its connection every poll, and heartbeats when due.
    heartbeat_s = settings.stream_heartbeat_ms / 1000
    poll_s = min(heartbeat_s, _POLL_S)
    idle_since_s = time.monotonic()
    queue = subscriber.queue
    while not connection.closed:
        items = []
        if queue.empty():
            try:
                async with asyncio.timeout(poll_s):  # no task per wait, unlike wait_for
                    items.append(await queue.get())
            except TimeoutError:
                if time.monotonic() - idle_since_s >= heartbeat_s:
                    await connection.heartbeat()
                    idle_since_s = time.monotonic()
                continue
        # Everything queued goes in one write: a burst costs one wait, not one
        # per event.
        items.extend(queue.get_nowait() for _ in range(queue.qsize()))
        await connection.send_all(items)
        idle_since_s = time.monotonic()


def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()


def _gap_body(hub: Hub, gap: Gap) -> dict[str, Any]:
    tp = hub.tps[gap.partition_index]
    return {
        "topic": tp.topic,
        "partition": tp.partition,
        "from_offset": gap.from_offset,
        "to_offset": gap.to_offset,
        "reason": "the topic no longer holds these records",
    }


# Server-Sent Events.


class _SseConnection:
    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._request = request
        self._response = response
        self.last_cursor: str | None = None

    @property
    def closed(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def send(self, item: Item) -> None:
        await self._response.write(item.sse_frame)
        self.last_cursor = item.cursor

    async def send_all(self, items: list[Item]) -> None:
        await self._response.write(b"".join(item.sse_frame for item in items))
        self.last_cursor = items[-1].cursor

    async def notice(self, kind: str, body: dict[str, Any]) -> None:
        frame = f"event: {kind}\ndata: {json.dumps(body)}\n"
        if kind == "ready":
            frame = f"retry: {_SSE_RETRY_MS}\nid: {body['cursor']}\n{frame}"
        await self._response.write((frame + "\n").encode())

    async def heartbeat(self) -> None:
        await self._response.write(b": heartbeat\n\n")


@app.page("/aggregator/stream/events/")
class EventStreamView(View):
    """A live stream as Server-Sent Events."""

    async def get(self, faust_request: Request) -> Response:
        request = cast(web.Request, faust_request)  # the aiohttp driver's request
        try:
            hub, stream_filter, cursor = _open_stream(request)
            await _start(hub)
        except InvalidQuery as exc:
            return self.json({"error": str(exc)}, status=exc.status)

        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **cors_headers(access, request),
            }
        )
        _bound_send_buffer(request)
        await response.prepare(request)
        connection = _SseConnection(request, response)
        await serve(connection, hub, stream_filter, cursor)
        _close_transport(request)
        return response  # type: ignore[return-value]  # aiohttp's, prepared here


def _bound_send_buffer(request: web.Request) -> None:
    """Keep the kernel from buffering megabytes for a client that reads nothing."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)


def _close_transport(request: web.Request) -> None:
    """Close the connection, flushing what it holds; abort it if it never flushes.

    A stalled client reads nothing, so its buffered bytes would keep the
    socket open for good.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    transport.close()
    asyncio.get_running_loop().call_later(_ABORT_AFTER_S, _abort, transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    """Abort a transport that did not close; one that did has no loop to call."""
    if isinstance(transport, asyncio.Transport):
        with contextlib.suppress(AttributeError, RuntimeError):
            transport.abort()


# WebSocket.


class _WsConnection:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self.last_cursor: str | None = None

    @property
    def closed(self) -> bool:
        return self._ws.closed

    async def send(self, item: Item) -> None:
        await self._ws.send_str(item.ws_text)
        self.last_cursor = item.cursor

    async def send_all(self, items: list[Item]) -> None:
        for item in items:
            await self.send(item)

    async def notice(self, kind: str, body: dict[str, Any]) -> None:
        await self._ws.send_str(json.dumps({"kind": kind, **body}))

    async def heartbeat(self) -> None:
        """Nothing: aiohttp pings the client at the heartbeat interval."""


@app.page("/aggregator/stream/ws/")
class WebSocketStreamView(View):
    """A live stream over a WebSocket."""

    async def get(self, faust_request: Request) -> Response:
        request = cast(web.Request, faust_request)  # the aiohttp driver's request
        try:
            hub, stream_filter, cursor = _open_stream(request)
            await _start(hub)
        except InvalidQuery as exc:
            return self.json({"error": str(exc)}, status=exc.status)

        ws = web.WebSocketResponse(heartbeat=settings.stream_heartbeat_ms / 1000)
        ws.headers.update(cors_headers(access, request))
        _bound_send_buffer(request)
        await ws.prepare(request)
        connection = _WsConnection(ws)
        streaming = asyncio.ensure_future(serve(connection, hub, stream_filter, cursor))
        reading = asyncio.ensure_future(_read_until_closed(ws))
        done, _ = await asyncio.wait(
            {streaming, reading}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (streaming, reading):
            if task not in done:
                task.cancel()
        await asyncio.gather(streaming, reading, return_exceptions=True)
        ended = streaming in done and streaming.exception() is None
        await _close_ws(ws, dropped_reason=streaming.result() if ended else None)
        _close_transport(request)
        return ws  # type: ignore[return-value]  # aiohttp's, prepared here


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    """Read what the client sends (nothing is expected), so pongs and closes count."""
    async for message in ws:
        if message.type == WSMsgType.ERROR:
            break


async def _close_ws(ws: web.WebSocketResponse, *, dropped_reason: str | None) -> None:
    """Close with 4008 for a client dropped as too slow, 1001 when the worker goes."""
    if ws.closed:
        return
    code, message = 1000, b""
    if dropped_reason is not None:
        code = DROPPED_CLOSE_CODE if dropped_reason.startswith(TOO_SLOW) else 1001
        message = f"dropped: {dropped_reason}".encode()[:_MAX_CLOSE_REASON_BYTES]
    with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
        await asyncio.wait_for(ws.close(code=code, message=message), 1.0)


# Dashboard.


@app.page("/aggregator/dashboard/")
class DashboardView(View):
    """The live dashboard: one page of HTML and JavaScript, no build step."""

    async def get(self, request: Request) -> Response:
        return self.html(_DASHBOARD.read_text())
