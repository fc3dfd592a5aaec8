"""Live streams of real workers: filters, resume, slow clients, token and CORS.

Events come through the real pipeline (detections in, observations out), or
are written straight to the run's aggregated topic when a test needs many of
them or a type the pipeline does not publish yet: the streams read that topic
whoever writes it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from aggregator_app.live.filters import StreamFilter, facets_of
from rules.config import load_rules

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GARAGE_FILE = REPO_ROOT / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl"
RULES = load_rules(REPO_ROOT / "config/aggregation-rules.yml")
TIMEOUT_S = 60.0


# Clients.


class SseClient:
    """One Server-Sent Events connection, read frame by frame."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def frames(self) -> AsyncIterator[dict[str, str]]:
        """Yield each frame as its fields (``id``, ``event``, ``data``)."""
        fields: dict[str, str] = {}
        async for raw in self.response.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if fields:
                    yield fields
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")


async def read_sse(
    session: aiohttp.ClientSession,
    url: str,
    *,
    count: int,
    headers: dict[str, str] | None = None,
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """Return ``count`` events (cursor, event) of an SSE stream, and its ready frame."""
    events: list[tuple[str, dict[str, Any]]] = []
    ready: dict[str, str] = {}
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        async for frame in SseClient(response).frames():
            if frame.get("event") == "ready":
                ready = frame
            elif "event" not in frame:
                events.append((frame["id"], json.loads(frame["data"])))
            if len(events) >= count:
                break
    return events, ready


# Records.


def aggregated(number: int, *, camera: str, confidence: float, kind: str) -> bytes:
    """Return an aggregated event of ``kind``, shaped as the pipeline publishes."""
    event_id = f"e{number}"
    return orjson.dumps(
        {
            "schema_version": 1,
            "aggregated_id": f"{kind}:{event_id}",
            "type": kind,
            "status": "open",
            "rule_id": "test",
            "camera_id": camera,
            "site_id": "lab",
            "detector": "person",
            "label": "person",
            "start_time_ms": 1_700_000_000_000 + number,
            "end_time_ms": 1_700_000_000_000 + number,
            "absorbed_count": 0,
            "absorbed_ids": [],
            "padding": "x" * 600,
            "event": {
                "event_id": event_id,
                "camera_id": camera,
                "zone_id": f"zone-{number % 3}",
                "confidence": confidence,
                "label": "person",
            },
        }
    )


async def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes],
    keys: Sequence[bytes],
    *,
    per_s: float | None = None,
) -> None:
    """Send records in order; ``per_s`` paces them (in steps of 20 records)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for number, (value, key) in enumerate(zip(values, keys, strict=True)):
            await producer.send(topic, value=value, key=key)
            if per_s is not None and number % 20 == 19:
                await producer.flush()
                await asyncio.sleep(20 / per_s)
        await producer.flush()
    finally:
        await producer.stop()


def synthetic(first: int, count: int) -> tuple[list[bytes], list[bytes]]:
    """Return ``count`` events from number ``first`` on, over four cameras."""
    values, keys = [], []
    for number in range(first, first + count):
        camera = f"cam-{number % 4}"
        values.append(
            aggregated(number, camera=camera, confidence=0.5, kind="observation")
        )
        keys.append(camera.encode())
    return values, keys


def wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def stream_url(worker: Any, path: str = "events", **params: str) -> str:
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return f"{worker.url}/aggregator/stream/{path}/?{query}"


def offsets_below(cursor: str) -> list[int]:
    return [int(part) for part in cursor.split(":", 1)[1].split(".")]


# Tests.


def test_sse_and_websocket_stream_the_pipeline_with_filters(
    worker_factory: Callable[..., Any],
    send_detections: Callable[..., Any],
    read_topic: Callable[..., Any],
) -> None:
    worker = worker_factory()
    payloads = [line for line in GARAGE_FILE.read_bytes().splitlines() if line][:300]
    auth = worker.auth_headers

    async def run() -> tuple[list[Any], list[Any], list[Any]]:
        async with aiohttp.ClientSession() as session:
            everything = asyncio.create_task(
                read_sse(session, stream_url(worker), count=40, headers=auth)
            )
            filtered = asyncio.create_task(
                read_sse(
                    session,
                    stream_url(worker, type="observation", min_confidence="0.9"),
                    count=10,
                    headers=auth,
                )
            )
            ws_events = asyncio.create_task(read_ws(session, worker, count=20))
            await asyncio.sleep(1.0)  # connected before the detections arrive
            await asyncio.to_thread(
                send_detections, worker.topic("detections.deepstream"), payloads
            )
            all_events, _ = await asyncio.wait_for(everything, TIMEOUT_S)
            some_events, _ = await asyncio.wait_for(filtered, TIMEOUT_S)
            ws = await asyncio.wait_for(ws_events, TIMEOUT_S)
        return all_events, some_events, ws

    all_events, some_events, ws = asyncio.run(run())
    records = read_topic(worker.topic("aggregated-events"), count=40)

    # The unfiltered stream is the topic, in order per partition, with cursors.
    def identity(event: dict[str, Any]) -> tuple[str, str]:
        return event["aggregated_id"], event["status"]

    by_id = {identity(orjson.loads(r.value)): r for r in records}
    for cursor, event in all_events:
        record = by_id[identity(event)]
        assert offsets_below(cursor)[record.partition] == record.offset + 1
    wanted = StreamFilter(types=frozenset({"observation"}), min_confidence=0.9)
    assert all(wanted.matches(facets_of(event)) for _, event in some_events)
    assert [identity(e) for _, e in ws] == [
        identity(e) for _, e in all_events[: len(ws)]
    ]


async def read_ws(
    session: aiohttp.ClientSession, worker: Any, *, count: int, **params: str
) -> list[tuple[str, dict[str, Any]]]:
    events = []
    url = stream_url(worker, "ws", token=worker.token, **params)
    async with session.ws_connect(url) as ws:
        async for message in ws:
            data = json.loads(message.data)
            if data["kind"] == "aggregated":
                events.append((data["cursor"], data["event"]))
            if len(events) >= count:
                break
    return events


def test_resume_by_last_event_id_and_cursor_misses_and_repeats_nothing(
    worker_factory: Callable[..., Any], kafka_bootstrap: str
) -> None:
    worker = worker_factory()
    topic = worker.topic("aggregated-events")
    auth = worker.auth_headers
    total = 600

    async def run() -> tuple[list[str], list[str]]:
        async with aiohttp.ClientSession() as session:
            # A client takes the first 150 of 300, leaves; 300 more come meanwhile.
            first = asyncio.create_task(
                read_sse(session, stream_url(worker), count=150, headers=auth)
            )
            await asyncio.sleep(1.0)
            await produce(kafka_bootstrap, topic, *synthetic(0, 300))
            head, _ = await asyncio.wait_for(first, TIMEOUT_S)
            later = asyncio.create_task(
                produce(kafka_bootstrap, topic, *synthetic(300, 300))
            )

            # SSE resumes from Last-Event-ID while records are still arriving.
            await asyncio.sleep(0.05)
            resumed, ready = await read_sse(
                session,
                stream_url(worker),
                count=total - 150,
                headers={**auth, "Last-Event-ID": head[-1][0]},
            )
            await later

            # WebSocket resumes from the 100th event's cursor.
            ws = await read_ws(session, worker, count=total - 100, cursor=head[99][0])
        assert ready["id"] == head[-1][0]
        sse_ids = [e["aggregated_id"] for _, e in head + resumed]
        ws_ids = [e["aggregated_id"] for _, e in head[:100] + ws]
        return sse_ids, ws_ids

    sse_ids, ws_ids = asyncio.run(run())
    expected = {f"observation:e{n}" for n in range(total)}
    for ids in (sse_ids, ws_ids):
        assert len(ids) == total, "an event was missed or repeated"
        assert set(ids) == expected


def stalled_client(worker: Any, request_head: str) -> socket.socket:
    """Return a connection that sent its request and will read nothing."""
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", int(worker.env["AGGREGATOR_WEB_PORT"])))
    stalled.sendall(f"{request_head}Host: 127.0.0.1\r\n\r\n".encode())
    return stalled


def test_stalled_clients_are_dropped_and_told_while_another_keeps_receiving(
    worker_factory: Callable[..., Any], kafka_bootstrap: str
) -> None:
    worker = worker_factory(AGGREGATOR_STREAM_QUEUE_EVENTS="50")
    topic = worker.topic("aggregated-events")
    count = 4000
    token = worker.token
    stalled_sse = stalled_client(
        worker, f"GET /aggregator/stream/events/?token={token} HTTP/1.1\r\n"
    )
    stalled_ws = stalled_client(
        worker,
        f"GET /aggregator/stream/ws/?token={token} HTTP/1.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: c3RhbGxlZC1jbGllbnQtMQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n",
    )

    def read_once_dropped(stalled: socket.socket) -> bytes:
        """Read nothing until the worker drops both, then read it all."""
        wait_for(
            lambda: worker.counts()["stream_clients_dropped"] == 2,
            timeout_s=TIMEOUT_S,
            what="the stalled clients dropped",
        )
        stalled.settimeout(15.0)
        received = b""
        while chunk := stalled.recv(65536):
            received += chunk
        stalled.close()
        return received

    async def run() -> tuple[list[Any], bytes, bytes]:
        async with aiohttp.ClientSession() as session:
            healthy = asyncio.create_task(
                read_sse(
                    session,
                    stream_url(worker),
                    count=count,
                    headers=worker.auth_headers,
                )
            )
            await asyncio.to_thread(
                wait_for,
                lambda: worker.counts()["stream_clients"] == 3,
                timeout_s=TIMEOUT_S,
                what="the clients connected",
            )
            readers = [
                asyncio.create_task(asyncio.to_thread(read_once_dropped, stalled))
                for stalled in (stalled_sse, stalled_ws)
            ]
            await produce(kafka_bootstrap, topic, *synthetic(0, count), per_s=2000)
            events, _ = await asyncio.wait_for(healthy, TIMEOUT_S)
            sse, ws = await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT_S)
        return events, sse, ws

    events, sse, ws = asyncio.run(run())

    assert len(events) == count
    assert len({event["aggregated_id"] for _, event in events}) == count
    farewell = sse.split(b"event: dropped\ndata: ", 1)[1].split(b"\n", 1)[0]
    assert json.loads(farewell)["reason"].startswith("too slow")
    assert json.loads(farewell)["cursor"].startswith("a:")
    assert b'"kind": "dropped", "reason": "too slow' in ws
    reason = b"dropped: too slow: 50 events waiting"
    close_frame = bytes([0x88, 2 + len(reason)]) + (4008).to_bytes(2, "big") + reason
    assert close_frame in ws
    wait_for(
        lambda: worker.counts()["stream_clients"] == 0,
        timeout_s=10,
        what="no client left",
    )
    with urllib.request.urlopen(f"{worker.url}/aggregator/metrics/") as response:
        lines = response.read().decode().splitlines()
    samples = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert float(samples["aggregator_stream_clients_dropped_total"]) == 2
    assert float(samples["aggregator_stream_clients_connected_total"]) == 3
    assert float(samples["aggregator_stream_clients"]) == 0


def _status(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_token_protects_streams_and_tables_and_cors_follows_the_origins(
    worker_factory: Callable[..., Any],
) -> None:
    # No token given: the worker makes one and keeps it in its data dir.
    worker = worker_factory(
        AGGREGATOR_API_TOKEN="",
        AGGREGATOR_CORS_ORIGINS="http://dashboard.example, http://other.example:8080",
    )
    token_file = Path(worker.env["AGGREGATOR_DATA_DIR"]) / "api-token"
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token_file.stat().st_mode & 0o077 == 0
    bearer = {"Authorization": f"Bearer {token}"}
    tables = f"{worker.url}/aggregator/tables/"

    assert _status(tables)[0] == 401
    assert _status(tables, {"Authorization": "Bearer wrong"})[0] == 401
    assert _status(stream_url(worker))[0] == 401
    assert _status(stream_url(worker, "ws"))[0] == 401
    assert _status(tables, bearer)[0] == 200
    assert _status(f"{tables}?token={token}")[0] == 200
    assert _status(stream_url(worker, token=token, zone="bad%20value!"))[0] == 400
    for open_path in ("health/live/", "metrics/", "counts/", "dashboard/"):
        assert _status(f"{worker.url}/aggregator/{open_path}")[0] == 200

    allowed = {"Origin": "http://dashboard.example", **bearer}
    status, headers = _status(tables, allowed)
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "http://dashboard.example"
    status, headers = _status(tables, {"Origin": "http://evil.example", **bearer})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    preflight = {
        "Origin": "http://other.example:8080",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    request = urllib.request.Request(tables, method="OPTIONS", headers=preflight)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == preflight["Origin"]
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    denied = urllib.request.Request(
        tables, method="OPTIONS", headers={**preflight, "Origin": "http://evil.example"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(denied, timeout=10)
    assert refused.value.code == 403

    # The SSE stream itself carries the CORS header for an allowed origin.
    async def stream_headers() -> Any:
        async with aiohttp.ClientSession() as session:
            async with session.get(stream_url(worker), headers=allowed) as response:
                return response.status, response.headers

    status, headers = asyncio.run(stream_headers())
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "http://dashboard.example"
    assert headers["Content-Type"] == "text/event-stream"


def test_detector_stream_and_event_types_other_than_observations(
    worker_factory: Callable[..., Any],
    send_detections: Callable[..., Any],
    kafka_bootstrap: str,
) -> None:
    worker = worker_factory(AGGREGATOR_STREAM_HEARTBEAT_MS="300")
    payloads = [line for line in GARAGE_FILE.read_bytes().splitlines() if line][:50]
    auth = worker.auth_headers

    async def run() -> tuple[list[Any], list[Any], bytes]:
        async with aiohttp.ClientSession() as session:
            detections = asyncio.create_task(
                read_sse(
                    session,
                    stream_url(worker, source="detector", type="vehicle"),
                    count=10,
                    headers=auth,
                )
            )
            correlated = asyncio.create_task(
                read_sse(
                    session,
                    stream_url(worker, type="correlated", camera="cam-1"),
                    count=2,
                    headers=auth,
                )
            )
            async with session.get(stream_url(worker), headers=auth) as idle:
                heartbeat = b""
                while b": heartbeat" not in heartbeat:
                    heartbeat += await asyncio.wait_for(idle.content.readline(), 5)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(
                send_detections, worker.topic("detections.deepstream"), payloads
            )
            values = [
                aggregated(n, camera=f"cam-{n % 2}", confidence=0.7, kind=kind)
                for n in range(8)
                for kind in ("observation", "correlated")
            ]
            await produce(
                kafka_bootstrap,
                worker.topic("aggregated-events"),
                values,
                [b"k"] * len(values),
            )
            found = await asyncio.wait_for(detections, TIMEOUT_S)
            other = await asyncio.wait_for(correlated, TIMEOUT_S)
        return found[0], other[0], heartbeat

    detections, correlated, heartbeat = asyncio.run(run())
    assert all(
        any(e["detector"] == "vehicle" for e in event["events"])
        and event["type"] == "detection"
        for _, event in detections
    )
    assert all(cursor.startswith("d:") for cursor, _ in detections)
    assert [e["aggregated_id"] for _, e in correlated] == [
        "correlated:e1",
        "correlated:e3",
    ]
    assert b": heartbeat" in heartbeat
