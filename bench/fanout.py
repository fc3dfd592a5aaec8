"""Live-stream fan-out: many SSE clients of one worker, one of them stalled.

    .venv/bin/python bench/fanout.py [--clients 1000] [--rate 20] [--seconds 20]
        [--processes 2] [--queue-events 1000]

1. Start a worker (``faust -A aggregator_app worker``) with a run of its own:
   app id, topic prefix, data dir, web port, API token.
2. Connect ``--clients`` SSE clients to ``/aggregator/stream/events/``, spread
   over ``--processes`` client processes (asyncio + aiohttp), and one stalled
   client: a raw socket with a 4 KiB receive buffer that sends its request
   and never reads.
3. Publish ``--rate`` aggregated events a second for ``--seconds`` straight to
   the run's aggregated topic; each carries its publish time (``sent_ns``,
   taken just before the producer's ``send``).
4. Every client notes, per event, the time it read it minus ``sent_ns``: the
   publish-to-client latency, through the broker, the worker's hub, its
   queue and the SSE connection, on this host's clock.
5. Print the latency percentiles over every delivery, how many deliveries
   arrived of how many were due, whether the stalled client was dropped, and
   the worker's CPU time. The clients run on the same two cores as the
   worker, the broker and the publisher: the figures are of this whole
   machine, not of the worker alone.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092")
_SENT_MARK = b'"sent_ns":'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rate", type=float, default=20.0, help="events/s")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--queue-events", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    return parser.parse_args()


# The worker.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        data: dict[str, Any] = orjson.loads(response.read())
    return data


def start_worker(
    run_id: str, data_dir: Path, port: int, token: str, queue_events: int
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP=BOOTSTRAP,
        AGGREGATOR_APP_ID=run_id,
        AGGREGATOR_TOPIC_PREFIX=f"{run_id}.",
        AGGREGATOR_DATA_DIR=str(data_dir),
        AGGREGATOR_WEB_PORT=str(port),
        AGGREGATOR_API_TOKEN=token,
        AGGREGATOR_STREAM_QUEUE_EVENTS=str(queue_events),
    )
    log = (data_dir / "worker.log").open("wb")
    command = [str(REPO_ROOT / ".venv/bin/faust"), "-A", "aggregator_app", "worker"]
    return subprocess.Popen(
        [*command, "-l", "warn"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
    )


def wait_for(url: str, check: Any, *, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            counts = get_json(url)
            if check(counts):
                return counts
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"fanout: timed out waiting for {what}")


def cpu_s(pid: int) -> float:
    """Return the user+system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Clients.


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    latencies_us: list[int],
    connected: asyncio.Event,
    count: list[int],
) -> None:
    """Read one SSE stream until cancelled, noting each event's latency."""
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, response.status
        connected.set()
        buffer = b""
        async for chunk in response.content.iter_any():
            now_ns = time.time_ns()
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                at = frame.find(_SENT_MARK)
                if at < 0:
                    continue
                start = at + len(_SENT_MARK)
                end = frame.find(b",", start)
                latencies_us.append((now_ns - int(frame[start:end])) // 1000)
                count[0] += 1


async def _clients(conn: Connection, url: str, token: str, clients: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    latencies_us: list[int] = []
    counts = [[0] for _ in range(clients)]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        events = [asyncio.Event() for _ in range(clients)]
        tasks = [
            asyncio.create_task(
                _client(session, url, headers, latencies_us, ready, count)
            )
            for ready, count in zip(events, counts, strict=True)
        ]
        await asyncio.gather(*(ready.wait() for ready in events))
        conn.send("connected")
        await asyncio.to_thread(conn.recv)  # "stop"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    conn.send(([count[0] for count in counts], latencies_us))


def client_process(conn: Connection, url: str, token: str, clients: int) -> None:
    asyncio.run(_clients(conn, url, token, clients))


def stalled_client(port: int, token: str) -> socket.socket:
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(
        f"GET /aggregator/stream/events/?token={token} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n\r\n".encode()
    )
    return stalled


# Publishing.


async def publish(topic: str, *, rate: float, seconds: float) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=0)
    await producer.start()
    sent = 0
    try:
        started_s = time.monotonic()
        while (elapsed_s := time.monotonic() - started_s) < seconds:
            due = int(elapsed_s * rate) + 1
            while sent < due:
                camera = f"cam-{sent % 16}"
                value = orjson.dumps(
                    {"sent_ns": time.time_ns(), **_observation(sent, camera)}
                )
                await producer.send(topic, value=value, key=camera.encode())
                sent += 1
            await asyncio.sleep(max(0.0, started_s + due / rate - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def _observation(number: int, camera: str) -> dict[str, Any]:
    event_id = f"bench-{number}"
    return {
        "aggregated_id": f"dedup-5s:{event_id}",
        "type": "observation",
        "status": "open",
        "rule_id": "dedup-5s",
        "camera_id": camera,
        "site_id": "bench",
        "detector": "vehicle",
        "label": "car",
        "start_time_ms": int(time.time() * 1000),
        "end_time_ms": int(time.time() * 1000),
        "absorbed_count": 0,
        # About the size of a garage observation (1.2 KB in all).
        "absorbed_ids": [f"{event_id}-absorbed-{n:02d}" for n in range(24)],
        "event": {
            "event_id": event_id,
            "detector": "vehicle",
            "source": "bench",
            "camera_id": camera,
            "event_time_ms": int(time.time() * 1000),
            "label": "car",
            "confidence": 0.9,
            "bbox": {"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4},
        },
    }


# The run.


def percentile(ordered: list[int], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] / 1000


def main() -> int:
    args = parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    run_id = f"fanout-{uuid.uuid4().hex[:8]}"
    data_dir = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
    port, token = free_port(), secrets.token_urlsafe(24)
    base = f"http://127.0.0.1:{port}/aggregator"
    worker = start_worker(run_id, data_dir, port, token, args.queue_events)
    try:
        return run(args, worker, base=base, port=port, token=token, run_id=run_id)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def run(
    args: argparse.Namespace,
    worker: subprocess.Popen[bytes],
    *,
    base: str,
    port: int,
    token: str,
    run_id: str,
) -> int:
    wait_for(
        f"{base}/counts/",
        lambda c: c.get("assigned_partitions", 0) > 0,
        timeout_s=120,
        what="the worker",
    )

    # Step 2.
    per_process = [
        len(range(first, args.clients, args.processes))
        for first in range(args.processes)
    ]
    pipes, processes = [], []
    for clients in per_process:
        ours, theirs = multiprocessing.Pipe()
        process = multiprocessing.Process(
            target=client_process,
            args=(theirs, f"{base}/stream/events/", token, clients),
        )
        process.start()
        pipes.append(ours)
        processes.append(process)
    for pipe in pipes:
        assert pipe.recv() == "connected"
    stalled = stalled_client(port, token)
    wait_for(
        f"{base}/counts/",
        lambda c: c["stream_clients"] == args.clients + 1,
        timeout_s=60,
        what="every client connected",
    )
    print(f"fanout: {args.clients} clients and 1 stalled client connected", flush=True)

    # Step 3.
    cpu_before_s = cpu_s(worker.pid)
    started_s = time.monotonic()
    sent = asyncio.run(
        publish(f"{run_id}.aggregated-events", rate=args.rate, seconds=args.seconds)
    )
    time.sleep(3.0)  # the last events reach the clients
    wall_s = time.monotonic() - started_s
    worker_cpu_s = cpu_s(worker.pid) - cpu_before_s
    counts = get_json(f"{base}/counts/")

    # Step 4.
    for pipe in pipes:
        pipe.send("stop")
    received, latencies_us = [], []
    for pipe, process in zip(pipes, processes, strict=True):
        per_client, latencies = pipe.recv()
        received.extend(per_client)
        latencies_us.extend(latencies)
        process.join(timeout=30)
    stalled.close()

    # Step 5.
    report(args, sent, received, sorted(latencies_us), counts, worker_cpu_s, wall_s)
    return 0


def report(
    args: argparse.Namespace,
    sent: int,
    received: list[int],
    ordered_us: list[int],
    counts: dict[str, Any],
    worker_cpu_s: float,
    wall_s: float,
) -> None:
    due = sent * args.clients
    complete = sum(1 for n in received if n == sent)
    print(f"events published        {sent} ({args.rate:g}/s for {args.seconds:g} s)")
    print(f"deliveries              {len(ordered_us)} of {due} due")
    print(f"clients with every one  {complete} of {args.clients}")
    print(f"stalled client dropped  {counts['stream_clients_dropped'] == 1}")
    if ordered_us:
        print(
            "latency ms              "
            f"p50={percentile(ordered_us, 0.50):.1f} "
            f"p90={percentile(ordered_us, 0.90):.1f} "
            f"p99={percentile(ordered_us, 0.99):.1f} "
            f"max={ordered_us[-1] / 1000:.1f} "
            f"mean={statistics.fmean(ordered_us) / 1000:.1f}"
        )
    print(
        f"worker cpu              {worker_cpu_s:.1f} s in {wall_s:.1f} s "
        f"({100 * worker_cpu_s / wall_s:.0f}% of one core)"
    )


if __name__ == "__main__":
    sys.exit(main())
