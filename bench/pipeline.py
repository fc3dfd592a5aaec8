"""One benchmark run: raw aiokafka passthrough against the whole pipeline.

    .venv/bin/python bench/pipeline.py [-n 20000] [--guarantee exactly_once]
        [--rate auto|EVENTS_PER_S] [--repeat-ratio R] [--profile]

Every run has its own id (``bench-<hex>``): a fresh app id and consumer group,
a temporary data dir, and a temporary copy of the rules file whose topics are
prefixed with the id. The steps:

1. Raw passthrough, flat out: a separate process consumes topic A (``getmany``
   batches) and produces every record to topic B; a reader process reads B.
2. Start one worker (``faust -A aggregator_app worker``) as a subprocess and wait
   until a probe message comes out of it as an ``open`` observation.
3. Pipeline, flat out: N garage-like DeepStream messages into the DeepStream
   topic; the reader matches every ``open`` observation on the aggregated topic
   to its message by message id (which carries the message's index).
4. Pipeline, paced at ``--rate`` (default: 80% of what step 3 sustained), for
   latency at a load the worker can carry.
5. Stop the worker, then the raw passthrough paced at the same rate.
6. Print the table; delete the run's topics and data dir.

Latency is from just before the producer's ``send`` to the moment the reader
gets the record back, both on this host's clock. The reader reads committed
records only, as a downstream consumer would; under exactly_once that includes
the wait for the transaction commit.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

__all__ = ["BenchConfig", "PassResult", "main"]

REPO: Final = Path(__file__).resolve().parent.parent
VENV_BIN: Final = REPO / ".venv" / "bin"
GARAGE_DATA: Final = Path("/work/shared/data/deepstream-360d-garage/demo-1.jsonl")
GARAGE_FIXTURE: Final = REPO / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl"
RULES: Final = REPO / "config" / "aggregation-rules.yml"

INDEX_HEADER: Final = "x-bench-index"
READY: Final = "ready"
STOP: Final = "stop"
READER_IDLE_S: Final = 30.0
WORKER_READY_TIMEOUT_S: Final = 120.0
WORKER_STOP_TIMEOUT_S: Final = 15.0
PROBE_EVERY_S: Final = 2.0
AUTO_RATE_SHARE: Final = 0.8
RECENT_KEPT: Final = 50

# Faust reads these from the environment and lets them override app.py.
FAUST_ENV: Final = (
    "BROKER_COMMIT_INTERVAL",
    "BROKER_COMMIT_EVERY",
    "BROKER_MAX_POLL_RECORDS",
    "STREAM_BUFFER_MAXSIZE",
    "STREAM_WAIT_EMPTY",
    "PRODUCER_LINGER",
    "PRODUCER_LINGER_MS",
    "PRODUCER_MAX_BATCH_SIZE",
    "PRODUCER_ACKS",
    "PROCESSING_GUARANTEE",
)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """The parameters of one run."""

    bootstrap: str
    count: int
    guarantee: str
    rate_per_s: float | None
    repeat_ratio: float
    seed: int
    profile: bool
    profile_s: int
    paced_max_s: float
    keep: bool


@dataclass(frozen=True, slots=True)
class RunContext:
    """Names and places of one run."""

    run_id: str
    tmp_dir: Path
    rules_path: Path
    partitions: int
    source_topic: str
    aggregated_topic: str
    dead_letter_topic: str


@dataclass(frozen=True, slots=True)
class BenchMessage:
    """One planned DeepStream message: its line, its object, kept or a repeat."""

    template: int
    object_id: str
    kept: bool


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds used so far: the whole host, one process, each of its threads."""

    wall_s: float
    host_busy_s: float
    process_s: float
    threads_s: dict[int, float]


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one pass measured."""

    name: str
    target_per_s: float | None
    sent: int
    expected: int
    observed: int
    duplicates: int
    send_s: float
    e2e_s: float
    sustained_per_s: float
    latencies_ms: list[float]
    drift_ms: float
    host_cpu_pct: float
    sut_cpu_pct: float
    threads_cpu_pct: list[float]

    @property
    def in_per_s(self) -> float:
        """Messages produced per second."""
        return self.sent / self.send_s if self.send_s > 0 else 0.0

    @property
    def processed_per_s(self) -> float:
        """Messages fully processed per second, first send to last arrival."""
        return self.sent / self.e2e_s if self.e2e_s > 0 else 0.0


# -- run context --------------------------------------------------------------


def make_context(cfg: BenchConfig) -> RunContext:
    """Create the run's id, data dir and rules copy with unique topic names."""
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))

    for source in rules["sources"]:
        source["topic"] = f"{run_id}.{source['topic']}"
    rules["aggregated_topic"] = (
        f"{run_id}.{rules.get('aggregated_topic', 'aggregated-events')}"
    )
    rules["dead_letter_topic"] = (
        f"{run_id}.{rules.get('dead_letter_topic', 'dead-letters')}"
    )
    rules_path = tmp_dir / "rules.yml"
    rules_path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")

    deepstream = next(s for s in rules["sources"] if s["adapter"] == "deepstream")
    return RunContext(
        run_id=run_id,
        tmp_dir=tmp_dir,
        rules_path=rules_path,
        partitions=int(rules.get("partitions", 4)),
        source_topic=deepstream["topic"],
        aggregated_topic=rules["aggregated_topic"],
        dead_letter_topic=rules["dead_letter_topic"],
    )


def worker_env(ctx: RunContext, cfg: BenchConfig, web_port: int) -> dict[str, str]:
    """Return the environment of the worker subprocess."""
    return os.environ | {
        "AGGREGATOR_APP_ID": ctx.run_id,
        "AGGREGATOR_DATA_DIR": str(ctx.tmp_dir / "data"),
        "AGGREGATOR_RULES": str(ctx.rules_path),
        "AGGREGATOR_WEB_PORT": str(web_port),
        "AGGREGATOR_GUARANTEE": cfg.guarantee,
        "KAFKA_BOOTSTRAP": cfg.bootstrap,
    }


def free_port() -> int:
    """Return a TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Create topics with the run's partition count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=partitions, replication_factor=1)
                for name in names
            ]
        )
    finally:
        await admin.close()


async def delete_run_topics(bootstrap: str, run_id: str) -> int:
    """Delete every topic whose name starts with the run id; return how many."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [name for name in await admin.list_topics() if name.startswith(run_id)]
        if names:
            await admin.delete_topics(names)
        return len(names)
    finally:
        await admin.close()


# -- messages -----------------------------------------------------------------


def load_templates(path: Path) -> list[dict[str, Any]]:
    """Return the garage's ``moving`` messages: real lines to vary."""
    lines = path.read_bytes().splitlines()
    messages = [orjson.loads(line) for line in lines if line.strip()]
    return [m for m in messages if m.get("event", {}).get("type") == "moving"]


def plan_messages(
    count: int, *, templates: int, repeat_ratio: float, seed: int, run_id: str
) -> list[BenchMessage]:
    """Plan ``count`` messages; a share ``repeat_ratio`` repeat a recent kept one.

    A kept message has an object id of its own, so the service keeps it; a
    repeat names the object of one of the last kept messages of the same
    camera line, seconds apart at most, so the service absorbs it.
    """
    rng = random.Random(seed)
    plan: list[BenchMessage] = []
    recent: list[BenchMessage] = []
    for index in range(count):
        if recent and rng.random() < repeat_ratio:
            plan.append(dataclasses.replace(rng.choice(recent), kept=False))
            continue
        message = BenchMessage(index % templates, f"{run_id}-o{index}", kept=True)
        plan.append(message)
        recent = [*recent[-(RECENT_KEPT - 1) :], message]
    return plan


def deepstream_payload(
    template: dict[str, Any], *, message_id: str, object_id: str, now_s: float
) -> bytes:
    """Return a template message with a new id, object id and current time."""
    message = dict(template)
    message["messageid"] = message_id
    message["object"] = dict(template["object"], id=object_id)
    moment = datetime.fromtimestamp(now_s, tz=UTC)
    message["@timestamp"] = (
        f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"
    )
    return orjson.dumps(message)


# -- producing ----------------------------------------------------------------

RecordFactory = Callable[[int], tuple[bytes | None, bytes, list[tuple[str, bytes]]]]


def new_producer(bootstrap: str) -> AIOKafkaProducer:
    """Return the producer that feeds every pass (batched, not idempotent)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=5,
        max_batch_size=512 * 1024,
        client_id="bench-producer",
    )


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    make_record: RecordFactory,
    indices: range,
    *,
    rate_per_s: float | None,
) -> list[float]:
    """Send one record per index, flat out or paced; return each send time (s).

    The send time is taken just before ``send``; every record is acked on return.
    """
    sent_s: list[float] = []
    pending = []
    start_s = time.monotonic()
    for position, index in enumerate(indices):
        if rate_per_s is not None:
            await _sleep_until(start_s + position / rate_per_s)
        key, value, headers = make_record(index)
        sent_s.append(time.time())
        pending.append(
            await producer.send(topic, value=value, key=key, headers=headers)
        )
        if len(pending) >= 5_000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return sent_s


async def _sleep_until(due_s: float) -> None:
    delay_s = due_s - time.monotonic()
    if delay_s > 0:
        await asyncio.sleep(delay_s)


# -- reader and passthrough processes -----------------------------------------


async def _assigned_consumer(
    bootstrap: str, topic: str, *, from_end: bool
) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    partitions = consumer.partitions_for_topic(topic)
    while not partitions:
        await consumer._client.force_metadata_update()  # noqa: SLF001  # no public way to wait for a new topic
        partitions = consumer.partitions_for_topic(topic)
    assigned = [TopicPartition(topic, partition) for partition in sorted(partitions)]
    consumer.assign(assigned)
    if from_end:
        await consumer.seek_to_end(*assigned)
    else:
        await consumer.seek_to_beginning(*assigned)
    for tp in assigned:
        await consumer.position(tp)  # resolve now, before anything is produced
    return consumer


def _index_from_header(record: Any, prefix: str) -> int | None:
    for name, value in record.headers or ():
        if name == INDEX_HEADER:
            return int(value)
    return None


def _index_from_open(record: Any, prefix: str) -> int | None:
    observation = orjson.loads(record.value)
    if observation.get("status") != "open":
        return None
    event_id = observation.get("event", {}).get("event_id", "")
    if not event_id.startswith(prefix):
        return None
    suffix = event_id[len(prefix) :]
    return int(suffix) if suffix.isdigit() else None


_EXTRACTORS: Final = {"header": _index_from_header, "open": _index_from_open}


async def _read(
    conn: Connection,
    *,
    bootstrap: str,
    topic: str,
    mode: str,
    prefix: str,
    wanted: set[int],
) -> tuple[dict[int, float], int]:
    consumer = await _assigned_consumer(bootstrap, topic, from_end=True)
    conn.send(READY)
    extract = _EXTRACTORS[mode]
    arrivals: dict[int, float] = {}
    duplicates = 0
    last_new_s = time.monotonic()
    try:
        while (
            len(arrivals) < len(wanted)
            and time.monotonic() - last_new_s < READER_IDLE_S
        ):
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            now_s = time.time()
            for records in batch.values():
                for record in records:
                    index = extract(record, prefix)
                    if index is None or index not in wanted:
                        continue
                    if index in arrivals:
                        duplicates += 1
                        continue
                    arrivals[index] = now_s
                    last_new_s = time.monotonic()
    finally:
        await consumer.stop()
    return arrivals, duplicates


def reader_process(
    conn: Connection,
    bootstrap: str,
    topic: str,
    mode: str,
    prefix: str,
    lo: int,
    hi: int,
) -> None:
    """Read ``topic`` until every index in ``[lo, hi)`` came back; send arrivals."""
    wanted = set(range(lo, hi))
    result = asyncio.run(
        _read(
            conn,
            bootstrap=bootstrap,
            topic=topic,
            mode=mode,
            prefix=prefix,
            wanted=wanted,
        )
    )
    conn.send(result)


async def _passthrough(
    conn: Connection, bootstrap: str, source: str, target: str
) -> None:
    consumer = await _assigned_consumer(bootstrap, source, from_end=True)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    conn.send(READY)
    try:
        while not conn.poll():
            batch = await consumer.getmany(timeout_ms=100, max_records=5_000)
            pending = [
                await producer.send(
                    target, value=r.value, key=r.key, headers=list(r.headers)
                )
                for records in batch.values()
                for r in records
            ]
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
        await consumer.stop()


def passthrough_process(
    conn: Connection, bootstrap: str, source: str, target: str
) -> None:
    """Copy every record of ``source`` to ``target`` until told to stop."""
    asyncio.run(_passthrough(conn, bootstrap, source, target))


class Child:
    """A helper process (reader or passthrough) and its end of a pipe."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=target, args=(child_conn, *args), daemon=True
        )
        self.process.start()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the child says it is ready."""
        if not self.conn.poll(timeout_s) or self.conn.recv() != READY:
            raise RuntimeError(f"helper process not ready: pid={self.process.pid}")

    async def result(self) -> Any:
        """Wait (without blocking the loop) for the child's result."""
        while not self.conn.poll():
            if not self.process.is_alive():
                raise RuntimeError(f"helper process died: pid={self.process.pid}")
            await asyncio.sleep(0.05)
        return self.conn.recv()

    def stop(self) -> None:
        """Ask the child to stop, then make sure it is gone."""
        with contextlib.suppress(OSError):
            self.conn.send(STOP)
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


# -- CPU accounting -----------------------------------------------------------


def cpu_sample(pid: int | None) -> CpuSample:
    """Read the host's busy CPU seconds and those of a process and its threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(value) for value in fields]
    idle = values[3] + values[4]
    host_busy_s = (sum(values[:8]) - idle) / ticks

    threads_s: dict[int, float] = {}
    if pid is not None:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
                threads_s[int(task.name)] = (int(stat[11]) + int(stat[12])) / ticks
    return CpuSample(time.monotonic(), host_busy_s, sum(threads_s.values()), threads_s)


def cpu_usage(before: CpuSample, after: CpuSample) -> tuple[float, float, list[float]]:
    """Return host busy %, process % and busiest threads % (100 = one core)."""
    wall_s = max(after.wall_s - before.wall_s, 1e-9)
    threads = sorted(
        (
            (used_s - before.threads_s.get(tid, 0.0)) / wall_s * 100
            for tid, used_s in after.threads_s.items()
        ),
        reverse=True,
    )
    return (
        (after.host_busy_s - before.host_busy_s) / wall_s * 100,
        (after.process_s - before.process_s) / wall_s * 100,
        threads[:3],
    )


# -- one pass -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PassSpec:
    """How to run one pass."""

    name: str
    topic: str
    read_topic: str
    mode: str
    prefix: str
    indices: range
    expected: set[int]
    rate_per_s: float | None
    make_record: RecordFactory
    sut_pid: int | None


async def run_pass(
    spec: PassSpec, cfg: BenchConfig, producer: AIOKafkaProducer
) -> PassResult:
    """Produce one pass, read it back, and measure it."""
    reader = Child(
        reader_process,
        cfg.bootstrap,
        spec.read_topic,
        spec.mode,
        spec.prefix,
        spec.indices.start,
        spec.indices.stop,
    )
    try:
        reader.wait_ready()
        before = cpu_sample(spec.sut_pid)
        sent_s = await produce(
            producer,
            spec.topic,
            spec.make_record,
            spec.indices,
            rate_per_s=spec.rate_per_s,
        )
        arrivals, duplicates = await reader.result()
        after = cpu_sample(spec.sut_pid)
    finally:
        reader.stop()
    return summarise(
        spec,
        sent_s=sent_s,
        arrivals=arrivals,
        duplicates=duplicates,
        cpu=cpu_usage(before, after),
    )


def summarise(
    spec: PassSpec,
    *,
    sent_s: list[float],
    arrivals: dict[int, float],
    duplicates: int,
    cpu: tuple[float, float, list[float]],
) -> PassResult:
    """Turn send and arrival times into throughput and latency."""
    first = spec.indices.start
    latencies_ms = [
        (arrived - sent_s[index - first]) * 1000
        for index, arrived in sorted(arrivals.items())
    ]
    last_arrival_s = max(arrivals.values(), default=sent_s[-1])
    return PassResult(
        name=spec.name,
        target_per_s=spec.rate_per_s,
        sent=len(sent_s),
        expected=len(spec.expected),
        observed=len(arrivals),
        duplicates=duplicates,
        send_s=sent_s[-1] - sent_s[0],
        e2e_s=last_arrival_s - sent_s[0],
        sustained_per_s=sustained_rate(sorted(arrivals.values()))
        * len(sent_s)
        / max(len(spec.expected), 1),
        latencies_ms=latencies_ms,
        drift_ms=drift_ms(latencies_ms),
        host_cpu_pct=cpu[0],
        sut_cpu_pct=cpu[1],
        threads_cpu_pct=cpu[2],
    )


def sustained_rate(arrivals_s: list[float]) -> float:
    """Return arrivals per second between the 10th and 90th percentile arrival."""
    if len(arrivals_s) < 10:
        return 0.0
    low, high = int(len(arrivals_s) * 0.1), int(len(arrivals_s) * 0.9)
    span_s = arrivals_s[high] - arrivals_s[low]
    return (high - low) / span_s if span_s > 0 else 0.0


def drift_ms(latencies_ms: list[float]) -> float:
    """Return the median latency of the last tenth minus that of the first."""
    tenth = len(latencies_ms) // 10
    if tenth == 0:
        return 0.0
    return percentile(latencies_ms[-tenth:], 50) - percentile(latencies_ms[:tenth], 50)


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the nearest-rank percentile, or NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- raw passthrough ----------------------------------------------------------


async def run_raw(
    ctx: RunContext,
    cfg: BenchConfig,
    producer: AIOKafkaProducer,
    *,
    name: str,
    rate_per_s: float | None,
    round_no: int,
) -> PassResult:
    """Measure the raw passthrough A -> B on fresh topics."""
    source, target = f"{ctx.run_id}.raw-a{round_no}", f"{ctx.run_id}.raw-b{round_no}"
    await create_topics(cfg.bootstrap, [source, target], ctx.partitions)
    payloads = [orjson.dumps(t) for t in load_templates(garage_path())[:200]]

    def make_record(index: int) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        return (
            None,
            payloads[index % len(payloads)],
            [(INDEX_HEADER, str(index).encode())],
        )

    passthrough = Child(passthrough_process, cfg.bootstrap, source, target)
    try:
        passthrough.wait_ready()
        indices = range(cfg.count)
        spec = PassSpec(
            name,
            source,
            target,
            "header",
            "",
            indices,
            set(indices),
            rate_per_s,
            make_record,
            passthrough.process.pid,
        )
        return await run_pass(spec, cfg, producer)
    finally:
        passthrough.stop()


def garage_path() -> Path:
    """Return the garage data file: the shared copy, else the test fixture."""
    return GARAGE_DATA if GARAGE_DATA.is_file() else GARAGE_FIXTURE


# -- the worker ---------------------------------------------------------------


def start_worker(ctx: RunContext, cfg: BenchConfig) -> subprocess.Popen[bytes]:
    """Start one worker; its output goes to ``<tmp>/worker.log``."""
    log = (ctx.tmp_dir / "worker.log").open("wb")
    worker = subprocess.Popen(
        [str(VENV_BIN / "faust"), "-A", "aggregator_app", "worker", "-l", os.environ.get("BENCH_WORKER_LOG_LEVEL", "warn")],
        cwd=REPO,
        env=worker_env(ctx, cfg, free_port()),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    atexit.register(stop_worker, worker)
    return worker


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Stop the worker: SIGTERM, then SIGKILL if it does not exit in time."""
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(WORKER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def log_tail(ctx: RunContext, lines: int = 30) -> str:
    """Return the end of the worker's log."""
    path = ctx.tmp_dir / "worker.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


async def wait_ready(
    ctx: RunContext,
    cfg: BenchConfig,
    worker: subprocess.Popen[bytes],
    producer: AIOKafkaProducer,
    templates: list[dict[str, Any]],
) -> float:
    """Send probes until one comes out as an observation; return seconds waited.

    Raises:
        RuntimeError: the worker exited, or no probe came out in time.
    """
    consumer = await _assigned_consumer(
        cfg.bootstrap, ctx.aggregated_topic, from_end=True
    )
    prefix = f"{ctx.run_id}-probe-"
    start_s = time.monotonic()
    try:
        for attempt in range(int(WORKER_READY_TIMEOUT_S / PROBE_EVERY_S)):
            if worker.poll() is not None:
                raise RuntimeError(
                    f"worker exited: code={worker.returncode}\n{log_tail(ctx)}"
                )
            value = deepstream_payload(
                templates[0],
                message_id=f"{prefix}{attempt}",
                object_id=f"{prefix}{attempt}",
                now_s=time.time(),
            )
            await producer.send_and_wait(ctx.source_topic, value=value)
            batch = await consumer.getmany(timeout_ms=int(PROBE_EVERY_S * 1000))
            if any(
                r.value and prefix.encode() in r.value
                for records in batch.values()
                for r in records
            ):
                return time.monotonic() - start_s
    finally:
        await consumer.stop()
    raise RuntimeError(
        f"worker not ready after {WORKER_READY_TIMEOUT_S} s\n{log_tail(ctx)}"
    )


def pipeline_spec(
    ctx: RunContext,
    plan: list[BenchMessage],
    templates: list[dict[str, Any]],
    *,
    name: str,
    indices: range,
    rate_per_s: float | None,
    worker_pid: int,
) -> PassSpec:
    """Describe a pipeline pass over ``plan[indices]``."""
    prefix = f"{ctx.run_id}-"

    def make_record(index: int) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        message = plan[index]
        template = templates[message.template]
        value = deepstream_payload(
            template,
            message_id=f"{prefix}{index:08d}",
            object_id=message.object_id,
            now_s=time.time(),
        )
        return template["sensor"]["id"].encode(), value, []

    expected = {index for index in indices if plan[index].kept}
    return PassSpec(
        name,
        ctx.source_topic,
        ctx.aggregated_topic,
        "open",
        prefix,
        indices,
        expected,
        rate_per_s,
        make_record,
        worker_pid,
    )


async def count_dead_letters(cfg: BenchConfig, ctx: RunContext) -> Counter[str]:
    """Count the run's dead letters by reason."""
    consumer = await _assigned_consumer(
        cfg.bootstrap, ctx.dead_letter_topic, from_end=False
    )
    reasons: Counter[str] = Counter()
    try:
        while batch := await consumer.getmany(timeout_ms=1000):
            for records in batch.values():
                for record in records:
                    headers = dict(record.headers or ())
                    reasons[headers.get("dead-letter-reason", b"?").decode()] += 1
    finally:
        await consumer.stop()
    return reasons


# -- profiling ----------------------------------------------------------------


async def start_profile(
    pid: int, seconds: int, out: Path
) -> asyncio.subprocess.Process:
    """Start py-spy on the worker's python process."""
    return await asyncio.create_subprocess_exec(
        str(VENV_BIN / "py-spy"),
        "record",
        "-p",
        str(pid),
        "-d",
        str(seconds),
        "-f",
        "raw",
        "-o",
        str(out),
        "--threads",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


@dataclass(frozen=True, slots=True)
class Profile:
    """Samples of a py-spy raw profile, by frame and by thread."""

    samples: int
    self_counts: Counter[str]
    total_counts: Counter[str]
    threads: Counter[str]


def read_profile(raw: Path) -> Profile:
    """Read py-spy's raw (collapsed) output, recorded with ``--threads``.

    A frame is ``function (file)``: line numbers are dropped, so that all lines
    of one function add up. The first frame of every stack is its thread.
    """
    profile = Profile(0, Counter(), Counter(), Counter())
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = [_frame_name(frame) for frame in stack.split(";")]
        samples += count
        profile.threads[thread] += count
        if frames:
            profile.self_counts[frames[-1]] += count
        for frame in set(frames):
            profile.total_counts[frame] += count
    return dataclasses.replace(profile, samples=samples)


def _frame_name(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
        path = path.split(marker, 1)[-1]
    return f"{name} ({path})" if path else name


def print_profile(profile: Profile, *, limit: int = 25) -> None:
    """Print the top frames by self and by total time, and time per thread."""
    total = max(profile.samples, 1)
    print(f"\nprofile: samples={profile.samples} (py-spy, 100 Hz, all threads)")
    print("samples per thread:")
    for thread, count in profile.threads.most_common():
        print(f"  {count / total:6.1%}  {thread}")
    for title, counts in (
        ("self", profile.self_counts),
        ("total", profile.total_counts),
    ):
        print(f"\ntop {limit} frames by {title} time:   self   total  frame")
        for frame, _count in counts.most_common(limit):
            self_pct = profile.self_counts[frame] / total
            total_pct = profile.total_counts[frame] / total
            print(f"  {self_pct:6.1%}  {total_pct:6.1%}  {frame}")


# -- the report ---------------------------------------------------------------

_COLUMNS: Final = (
    ("pass", 24),
    ("target/s", 9),
    ("sent", 7),
    ("seen", 7),
    ("in/s", 8),
    ("e2e/s", 8),
    ("steady/s", 9),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("max ms", 8),
    ("drift ms", 9),
    ("host cpu", 9),
    ("sut cpu", 8),
    ("threads cpu", 16),
)


def print_parameters(cfg: BenchConfig, ctx: RunContext) -> None:
    """Print what was run, with which settings."""
    overrides = {name: os.environ[name] for name in FAUST_ENV if name in os.environ}
    print(
        f"\nbench run {ctx.run_id}: host cpus={os.cpu_count()} bootstrap={cfg.bootstrap}"
    )
    print(
        f"  messages per pass={cfg.count} guarantee={cfg.guarantee} "
        f"repeat_ratio={cfg.repeat_ratio} seed={cfg.seed} partitions={ctx.partitions} "
        f"profile={cfg.profile}"
    )
    print(f"  faust settings from env: {overrides or 'none (app.py values)'}")


def print_results(results: list[PassResult]) -> None:
    """Print one row per pass."""
    print()
    print(
        " ".join(
            title.rjust(width) if i else title.ljust(width)
            for i, (title, width) in enumerate(_COLUMNS)
        )
    )
    for result in results:
        print(
            " ".join(
                _cell(value, width, first=i == 0)
                for i, (value, (_t, width)) in enumerate(
                    zip(_row(result), _COLUMNS, strict=True)
                )
            )
        )


def _row(result: PassResult) -> list[str]:
    target = "max" if result.target_per_s is None else f"{result.target_per_s:.0f}"
    threads = "/".join(f"{pct:.0f}" for pct in result.threads_cpu_pct)
    return [
        result.name,
        target,
        str(result.sent),
        f"{result.observed}/{result.expected}"
        if result.observed != result.expected
        else str(result.observed),
        f"{result.in_per_s:.0f}",
        f"{result.processed_per_s:.0f}",
        f"{result.sustained_per_s:.0f}",
        f"{percentile(result.latencies_ms, 50):.0f}",
        f"{percentile(result.latencies_ms, 99):.0f}",
        f"{max(result.latencies_ms, default=float('nan')):.0f}",
        f"{result.drift_ms:+.0f}",
        f"{result.host_cpu_pct:.0f}%",
        f"{result.sut_cpu_pct:.0f}%",
        threads,
    ]


def _cell(value: str, width: int, *, first: bool) -> str:
    return value.ljust(width) if first else value.rjust(width)


def print_legend() -> None:
    """Say what each column means."""
    print(
        """
  in/s      messages produced per second (first to last send)
  e2e/s     messages fully processed per second: all sent / (last observation - first send)
  steady/s  processing rate in steady state: observations per second between the 10th and
            90th percentile arrival, scaled to messages (repeats included)
  p50/p99/max ms  send -> observation read back (committed), over observed messages
  drift ms  median latency of the last tenth minus the first: > 0 = a queue builds up
  host cpu  busy CPU of the whole host (100% = one core); sut cpu = the system under test
            (passthrough process or worker); threads cpu = its three busiest threads"""
    )


def print_summary(
    results: dict[str, PassResult], dead_letters: Counter[str], ready_s: float
) -> None:
    """Print the ratios and verdicts that the table implies."""
    raw, pipe = results.get("raw flat-out"), results.get("pipeline flat-out")
    if raw and pipe and raw.sustained_per_s > 0:
        ratio = pipe.sustained_per_s / raw.sustained_per_s
        print(
            f"\npipeline/raw steady throughput: {ratio:.3f} ({pipe.sustained_per_s:.0f} / {raw.sustained_per_s:.0f} per s)"
        )
    paced = results.get("pipeline paced")
    if paced is not None and paced.target_per_s:
        keeps_up = (
            paced.processed_per_s >= 0.95 * paced.target_per_s and paced.drift_ms < 100
        )
        print(
            f"worker keeps up at {paced.target_per_s:.0f}/s: {'yes' if keeps_up else 'no'}; p99 {percentile(paced.latencies_ms, 99):.0f} ms"
        )
    print(
        f"worker ready after {ready_s:.1f} s; dead letters: {dict(dead_letters) or 'none'}"
    )


# -- the run ------------------------------------------------------------------


async def bench(cfg: BenchConfig) -> int:
    """Run every pass, print the report; return the exit code."""
    ctx = make_context(cfg)
    print_parameters(cfg, ctx)
    producer = new_producer(cfg.bootstrap)
    await producer.start()
    results: dict[str, PassResult] = {}
    try:
        await create_topics(
            cfg.bootstrap,
            [ctx.source_topic, ctx.aggregated_topic, ctx.dead_letter_topic],
            ctx.partitions,
        )
        results["raw flat-out"] = await run_raw(
            ctx, cfg, producer, name="raw flat-out", rate_per_s=None, round_no=1
        )
        pipeline_results, dead_letters, ready_s = await run_pipeline(ctx, cfg, producer)
        results.update(pipeline_results)
        rate = results["pipeline paced"].target_per_s
        results["raw paced"] = await run_raw(
            ctx, cfg, producer, name="raw paced", rate_per_s=rate, round_no=2
        )
    finally:
        await producer.stop()
        await cleanup(ctx, cfg)

    print_results(list(results.values()))
    print_legend()
    print_summary(results, dead_letters, ready_s)
    return 0


async def run_pipeline(
    ctx: RunContext, cfg: BenchConfig, producer: AIOKafkaProducer
) -> tuple[dict[str, PassResult], Counter[str], float]:
    """Start a worker, run the flat-out and paced passes, stop the worker."""
    templates = load_templates(garage_path())
    plan = plan_messages(
        2 * cfg.count,
        templates=len(templates),
        repeat_ratio=cfg.repeat_ratio,
        seed=cfg.seed,
        run_id=ctx.run_id,
    )
    worker = start_worker(ctx, cfg)
    results: dict[str, PassResult] = {}
    try:
        ready_s = await wait_ready(ctx, cfg, worker, producer, templates)
        flat = pipeline_spec(
            ctx,
            plan,
            templates,
            name="pipeline flat-out",
            indices=range(cfg.count),
            rate_per_s=None,
            worker_pid=worker.pid,
        )
        results[flat.name] = await _profiled(flat, cfg, producer, ctx, worker.pid)
        rate = cfg.rate_per_s or _auto_rate(results[flat.name])
        count = min(cfg.count, int(rate * cfg.paced_max_s))
        paced = pipeline_spec(
            ctx,
            plan,
            templates,
            name="pipeline paced",
            indices=range(cfg.count, cfg.count + count),
            rate_per_s=rate,
            worker_pid=worker.pid,
        )
        results[paced.name] = await run_pass(paced, cfg, producer)
        dead_letters = await count_dead_letters(cfg, ctx)
    finally:
        stop_worker(worker)
    return results, dead_letters, ready_s


def _auto_rate(flat: PassResult) -> float:
    return max(100.0, round(flat.sustained_per_s * AUTO_RATE_SHARE, -2))


async def _profiled(
    spec: PassSpec,
    cfg: BenchConfig,
    producer: AIOKafkaProducer,
    ctx: RunContext,
    pid: int,
) -> PassResult:
    if not cfg.profile:
        return await run_pass(spec, cfg, producer)
    out = ctx.tmp_dir / "profile.txt"
    spy = await start_profile(pid, cfg.profile_s, out)
    result = await run_pass(spec, cfg, producer)
    _, stderr = await spy.communicate()
    if spy.returncode != 0 or not out.exists():
        print(
            f"py-spy failed: code={spy.returncode} {stderr.decode(errors='replace')[-500:]}"
        )
        return result
    shutil.copy(out, Path(tempfile.gettempdir()) / f"{ctx.run_id}-profile.txt")
    print_profile(read_profile(out))
    return result


async def cleanup(ctx: RunContext, cfg: BenchConfig) -> None:
    """Delete the run's topics and data dir, unless ``--keep``."""
    if cfg.keep:
        print(f"kept: topics {ctx.run_id}* and {ctx.tmp_dir}")
        return
    with contextlib.suppress(Exception):
        await delete_run_topics(cfg.bootstrap, ctx.run_id)
    shutil.rmtree(ctx.tmp_dir, ignore_errors=True)


def _rate(text: str) -> float | None:
    return None if text == "auto" else float(text)


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-n", "--count", type=int, default=20_000, help="messages per pass"
    )
    parser.add_argument(
        "--guarantee", choices=("exactly_once", "at_least_once"), default="exactly_once"
    )
    parser.add_argument(
        "--rate",
        type=_rate,
        default=None,
        help="paced passes, events/s (default auto: 80%% of the flat-out steady rate)",
    )
    parser.add_argument(
        "--repeat-ratio",
        type=float,
        default=0.0,
        help="share of messages that repeat a recent kept one",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the worker during the flat-out pass",
    )
    parser.add_argument("--profile-s", type=int, default=15)
    parser.add_argument(
        "--paced-max-s", type=float, default=15.0, help="longest paced pass"
    )
    parser.add_argument(
        "--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092")
    )
    parser.add_argument("--keep", action="store_true", help="keep topics and data dir")
    args = parser.parse_args(argv)
    return BenchConfig(
        bootstrap=args.bootstrap,
        count=args.count,
        guarantee=args.guarantee,
        rate_per_s=args.rate,
        repeat_ratio=args.repeat_ratio,
        seed=args.seed,
        profile=args.profile,
        profile_s=args.profile_s,
        paced_max_s=args.paced_max_s,
        keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark once."""
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return asyncio.run(bench(cfg))


if __name__ == "__main__":
    sys.exit(main())
