"""One benchmark run: raw aiokafka passthrough against the whole pipeline.

    .venv/bin/python bench/pipeline.py [-n 20000] [--guarantee at_least_once]
        [--rate auto|EVENTS_PER_S] [--repeat-ratio R] [--profile]

Every pipeline pass has its own id (``bench-<hex>``): a fresh app id and
consumer group, a temporary data dir, a temporary copy of the rules file whose
topics are prefixed with the id, and a worker of its own. Steps:

1. Raw passthrough, flat out: a separate process consumes topic A (``getmany``
   batches) and produces every record to topic B; a reader process reads B.
2. Pipeline, flat out: start a worker (``faust -A aggregator_app worker``),
   wait until a probe comes out of it as an ``open`` observation, then send N
   garage-like DeepStream messages. A reader process matches every ``open``
   observation to its message by the message id, which carries its index.
   With ``--profile``, py-spy records the worker meanwhile.
3. Pipeline, paced at ``--rate`` (default: 80% of the steady rate of step 2),
   with a fresh worker: the latency at a load the worker should carry.
4. The raw passthrough paced at the same rate.
5. Print the table. Each pass deletes its topics and its data dir, and stops
   its worker whatever happens.

Latency runs from just before the producer's ``send`` to the moment the reader
gets the record, both on this host's clock. Readers read committed records
only, as a downstream consumer would: under exactly_once the latency includes
the wait for the transaction commit. See bench/README.md for each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import json
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
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

__all__ = ["BenchConfig", "PassResult", "main"]

REPO: Final = Path(__file__).resolve().parent.parent
VENV_BIN: Final = REPO / ".venv" / "bin"
#: ``BENCH_RULES`` names another rules file (e.g. one with correlation off).
RULES: Final = Path(
    os.environ.get("BENCH_RULES", REPO / "config" / "aggregation-rules.yml")
)
BROKER_PID_FILE: Final = REPO / ".var" / "kafka" / "kafka.pid"
GARAGE_FILES: Final = (
    Path("/work/shared/data/deepstream-360d-garage/demo-1.jsonl"),
    REPO / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl",
)

INDEX_HEADER: Final = "x-bench-index"
READY: Final = "ready"
STOP: Final = "stop"
READER_IDLE_S: Final = 20.0
WORKER_READY_TIMEOUT_S: Final = 120.0
WORKER_STOP_TIMEOUT_S: Final = 15.0
PROBE_EVERY_S: Final = 2.0
AUTO_RATE_SHARE: Final = 0.8
TARGET_PER_S: Final = 10_000
TARGET_P99_MS: Final = 100
RECENT_KEPT: Final = 50
MAX_PENDING_SENDS: Final = 5_000
_TICKS: Final = os.sysconf("SC_CLK_TCK")

# Faust reads these from the environment, and they override app.py's values.
FAUST_ENV: Final = (
    "BROKER_COMMIT_INTERVAL",
    "BROKER_COMMIT_EVERY",
    "BROKER_MAX_POLL_RECORDS",
    "CONSUMER_MAX_FETCH_SIZE",
    "STREAM_BUFFER_MAXSIZE",
    "STREAM_WAIT_EMPTY",
    "PRODUCER_LINGER",
    "PRODUCER_MAX_BATCH_SIZE",
    "PRODUCER_ACKS",
    "CLICKHOUSE_URL",
)

RecordParts = tuple[bytes | None, bytes, list[tuple[str, bytes]]]
RecordFactory = Callable[[int], RecordParts]


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
    pass_timeout_s: float
    log_level: str
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
    """One planned DeepStream message: its real line, its object, kept or not."""

    template: int
    object_id: str
    kept: bool


@dataclass(frozen=True, slots=True)
class PassSpec:
    """How to run one pass."""

    name: str
    topic: str
    read_topic: str
    partitions: int
    mode: str
    prefix: str
    indices: range
    expected: frozenset[int]
    rate_per_s: float | None
    make_record: RecordFactory
    sut_pid: int | None


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU use over a pass, in % of one core."""

    host_pct: float
    sut_pct: float
    main_thread_pct: float
    main_thread_s: float
    other_threads_pct: list[float]
    bench_pct: float
    broker_pct: float
    rest_pct: float


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
    steady_per_s: float
    latencies_ms: list[float]
    drift_ms: float
    cpu: CpuUse

    @property
    def in_per_s(self) -> float:
        """Messages produced per second."""
        return self.sent / self.send_s if self.send_s > 0 else 0.0

    @property
    def processed(self) -> float:
        """Messages fully processed: those sent, scaled by the share seen."""
        return self.sent * self.observed / self.expected if self.expected else 0.0

    @property
    def per_main_cpu_s(self) -> float:
        """Messages processed per CPU second of the SUT's main thread."""
        main_s = self.cpu.main_thread_s
        return self.processed / main_s if main_s > 0 else 0.0

    @property
    def processed_per_s(self) -> float:
        """Messages fully processed per second, first send to last arrival."""
        return self.processed / self.e2e_s if self.e2e_s > 0 else 0.0


@dataclass(slots=True)
class Worker:
    """The worker subprocess and where to reach it."""

    process: subprocess.Popen[bytes]
    web_port: int
    log_path: Path


# -- run context and topics ---------------------------------------------------


def make_context(cfg: BenchConfig) -> RunContext:
    """Create the run's id, data dir, and rules copy with unique topic names."""
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))

    for source in rules["sources"]:
        source["topic"] = f"{run_id}.{source['topic']}"
    for field, default in (
        ("aggregated_topic", "aggregated-events"),
        ("dead_letter_topic", "dead-letters"),
    ):
        rules[field] = f"{run_id}.{rules.get(field, default)}"
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
        topics = [NewTopic(name, partitions, replication_factor=1) for name in names]
        await admin.create_topics(topics)
    finally:
        await admin.close()


async def delete_run_topics(bootstrap: str, run_id: str) -> None:
    """Delete every topic whose name starts with the run id."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [name for name in await admin.list_topics() if name.startswith(run_id)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


# -- messages -----------------------------------------------------------------


def garage_path() -> Path:
    """Return the garage recording: the shared data copy, else the test fixture."""
    return next((path for path in GARAGE_FILES if path.is_file()), GARAGE_FILES[-1])


def load_templates(path: Path) -> list[dict[str, Any]]:
    """Return the garage's ``moving`` messages: the real lines to vary."""
    messages = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return [m for m in messages if m.get("event", {}).get("type") == "moving"]


def plan_messages(
    count: int, *, templates: int, repeat_ratio: float, seed: int, run_id: str
) -> list[BenchMessage]:
    """Plan ``count`` messages; a share ``repeat_ratio`` repeat a recent kept one.

    A kept message has an object id of its own, so the service keeps it. A
    repeat names the object (and camera) of one of the last kept messages,
    milliseconds to seconds later, so the service absorbs it.
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
    """Return a real message with a new message id, object id and time."""
    moment = datetime.fromtimestamp(now_s, tz=UTC)
    message = dict(template)
    message["messageid"] = message_id
    message["object"] = dict(template["object"], id=object_id)
    message["@timestamp"] = (
        f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"
    )
    return orjson.dumps(message)


# -- producing ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def started_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """Yield the producer that feeds one pass (batched, acks from the leader).

    Each pass stops its producer before its topics are deleted: a producer
    that lives on refreshes their metadata, and a broker that creates topics
    on demand would bring them back.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=5,
        max_batch_size=512 * 1024,
        client_id="bench-producer",
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    make_record: RecordFactory,
    indices: range,
    *,
    rate_per_s: float | None,
) -> list[float]:
    """Send one record per index, flat out or paced; return each send time.

    A send time (epoch s) is taken just before ``send``; every record is acked
    when this returns.
    """
    sent_s: list[float] = []
    pending: list[asyncio.Future[Any]] = []
    start_s = time.monotonic()

    for position, index in enumerate(indices):
        if rate_per_s is not None:
            await _sleep_until(start_s + position / rate_per_s)
        key, value, headers = make_record(index)
        sent_s.append(time.time())
        pending.append(
            await producer.send(topic, value=value, key=key, headers=headers)
        )
        if len(pending) >= MAX_PENDING_SENDS:
            await asyncio.gather(*pending)
            pending.clear()

    await asyncio.gather(*pending)
    return sent_s


async def _sleep_until(due_s: float) -> None:
    delay_s = due_s - time.monotonic()
    if delay_s > 0:
        await asyncio.sleep(delay_s)


# -- reader and passthrough processes -----------------------------------------


async def assigned_consumer(
    bootstrap: str, topic: str, *, partitions: int, from_end: bool
) -> AIOKafkaConsumer:
    """Return a consumer of every partition of ``topic``, positions resolved.

    No consumer group: assignment is immediate. The positions are fetched
    before returning, so that nothing produced afterwards can be missed.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()

    assigned = [TopicPartition(topic, partition) for partition in range(partitions)]
    consumer.assign(assigned)
    seek = consumer.seek_to_end if from_end else consumer.seek_to_beginning
    await seek(*assigned)
    for tp in assigned:
        await consumer.position(tp)
    return consumer


def _index_from_header(record: ConsumerRecord[Any, Any], prefix: str) -> int | None:
    for name, value in record.headers or ():
        if name == INDEX_HEADER:
            return int(value)
    return None


def _index_from_open(record: ConsumerRecord[Any, Any], prefix: str) -> int | None:
    observation = orjson.loads(record.value)
    if observation.get("status") != "open":
        return None
    event_id = observation.get("event", {}).get("event_id", "")
    suffix = event_id[len(prefix) :] if event_id.startswith(prefix) else ""
    return int(suffix) if suffix.isdigit() else None


_EXTRACTORS: Final = {"header": _index_from_header, "open": _index_from_open}


@dataclass(frozen=True, slots=True)
class ReaderArgs:
    """What a reader process reads, and what it waits for."""

    bootstrap: str
    topic: str
    partitions: int
    mode: str
    prefix: str
    wanted: frozenset[int]
    timeout_s: float


async def _read(conn: Connection, args: ReaderArgs) -> tuple[dict[int, float], int]:
    consumer = await assigned_consumer(
        args.bootstrap, args.topic, partitions=args.partitions, from_end=True
    )
    conn.send(READY)
    extract = _EXTRACTORS[args.mode]
    arrivals: dict[int, float] = {}
    duplicates = 0
    deadline_s = time.monotonic() + args.timeout_s
    last_new_s = time.monotonic()

    try:
        while len(arrivals) < len(args.wanted):
            now_s = time.monotonic()
            if now_s > deadline_s or now_s - last_new_s > READER_IDLE_S:
                break
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            arrived_s = time.time()
            for record in (r for records in batch.values() for r in records):
                index = extract(record, args.prefix)
                if index is None or index not in args.wanted:
                    continue
                if index in arrivals:
                    duplicates += 1
                    continue
                arrivals[index] = arrived_s
                last_new_s = time.monotonic()
    finally:
        await consumer.stop()
    return arrivals, duplicates


def reader_process(conn: Connection, args: ReaderArgs) -> None:
    """Read until every wanted index came back, or time is up; send arrivals."""
    conn.send(asyncio.run(_read(conn, args)))


@dataclass(frozen=True, slots=True)
class TapArgs:
    """Where the raw passthrough reads and writes."""

    bootstrap: str
    source: str
    target: str
    partitions: int


async def _passthrough(conn: Connection, args: TapArgs) -> None:
    consumer = await assigned_consumer(
        args.bootstrap, args.source, partitions=args.partitions, from_end=True
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks=1,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    conn.send(READY)

    try:
        while not conn.poll():
            batch = await consumer.getmany(timeout_ms=100, max_records=5_000)
            records = [r for part in batch.values() for r in part]
            pending = [
                await producer.send(
                    args.target, value=r.value, key=r.key, headers=list(r.headers)
                )
                for r in records
            ]
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
        await consumer.stop()


def passthrough_process(conn: Connection, args: TapArgs) -> None:
    """Copy every record of the source topic to the target until told to stop."""
    asyncio.run(_passthrough(conn, args))


class Child:
    """A helper process (reader or passthrough) and our end of its pipe."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=target, args=(child_conn, *args), daemon=True
        )
        self.process.start()

    @property
    def pid(self) -> int | None:
        """Return the process id."""
        return self.process.pid

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the child says it is ready.

        Raises:
            RuntimeError: it did not, in time.
        """
        if not self.conn.poll(timeout_s) or self.conn.recv() != READY:
            raise RuntimeError(f"helper process not ready: pid={self.pid}")

    async def result(self) -> Any:
        """Wait, without blocking the loop, for the child's result.

        Raises:
            RuntimeError: the child died first.
        """
        while not self.conn.poll():
            if not self.process.is_alive():
                raise RuntimeError(f"helper process died: pid={self.pid}")
            await asyncio.sleep(0.05)
        return self.conn.recv()

    def stop(self) -> None:
        """Ask the child to stop, then make sure that it is gone."""
        with contextlib.suppress(OSError):
            self.conn.send(STOP)
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


# -- CPU accounting -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds used so far: the host, each thread of the SUT, the others."""

    wall_s: float
    host_busy_s: float
    threads_s: dict[int, float]
    bench_s: float
    broker_s: float


def cpu_sample(sut_pid: int | None, *, bench_pids: Sequence[int] = ()) -> CpuSample:
    """Read the busy CPU seconds of the host, the SUT's threads, bench and broker."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    values = [int(value) for value in fields]
    host_busy_s = (sum(values) - values[3] - values[4]) / _TICKS

    threads_s: dict[int, float] = {}
    for task in Path(f"/proc/{sut_pid}/task").glob("*") if sut_pid else ():
        threads_s[int(task.name)] = _cpu_s(task / "stat")
    bench_s = sum(_cpu_s(Path(f"/proc/{pid}/stat")) for pid in bench_pids)
    broker_s = _cpu_s(Path(f"/proc/{_broker_pid()}/stat"))
    return CpuSample(time.monotonic(), host_busy_s, threads_s, bench_s, broker_s)


def _cpu_s(stat_path: Path) -> float:
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _broker_pid() -> int:
    try:
        return int(BROKER_PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return 0


def cpu_use(before: CpuSample, after: CpuSample, sut_pid: int | None) -> CpuUse:
    """Return the CPU used between two samples, in % of one core."""
    wall_s = max(after.wall_s - before.wall_s, 1e-9)
    threads_pct = {
        tid: (used_s - before.threads_s.get(tid, 0.0)) / wall_s * 100
        for tid, used_s in after.threads_s.items()
    }
    main_pct = threads_pct.pop(sut_pid, 0.0) if sut_pid else 0.0
    sut_pct = main_pct + sum(threads_pct.values())
    host_pct = (after.host_busy_s - before.host_busy_s) / wall_s * 100
    bench_pct = (after.bench_s - before.bench_s) / wall_s * 100
    broker_pct = (after.broker_s - before.broker_s) / wall_s * 100
    return CpuUse(
        host_pct=host_pct,
        sut_pct=sut_pct,
        main_thread_pct=main_pct,
        main_thread_s=main_pct / 100 * wall_s,
        other_threads_pct=sorted(threads_pct.values(), reverse=True)[:2],
        bench_pct=bench_pct,
        broker_pct=broker_pct,
        rest_pct=max(0.0, host_pct - sut_pct - bench_pct - broker_pct),
    )


# -- one pass -----------------------------------------------------------------


async def run_pass(
    spec: PassSpec, cfg: BenchConfig, producer: AIOKafkaProducer
) -> PassResult:
    """Produce one pass, read it back, and measure it."""
    reader = Child(
        reader_process,
        ReaderArgs(
            bootstrap=cfg.bootstrap,
            topic=spec.read_topic,
            partitions=spec.partitions,
            mode=spec.mode,
            prefix=spec.prefix,
            wanted=spec.expected,
            timeout_s=cfg.pass_timeout_s,
        ),
    )
    try:
        reader.wait_ready()
        bench_pids = [os.getpid(), reader.pid or 0]
        before = cpu_sample(spec.sut_pid, bench_pids=bench_pids)
        sent_s = await produce(
            producer,
            spec.topic,
            spec.make_record,
            spec.indices,
            rate_per_s=spec.rate_per_s,
        )
        arrivals, duplicates = await reader.result()
        after = cpu_sample(spec.sut_pid, bench_pids=bench_pids)
    finally:
        reader.stop()

    cpu = cpu_use(before, after, spec.sut_pid)
    return summarise(
        spec, sent_s=sent_s, arrivals=arrivals, duplicates=duplicates, cpu=cpu
    )


def summarise(
    spec: PassSpec,
    *,
    sent_s: list[float],
    arrivals: dict[int, float],
    duplicates: int,
    cpu: CpuUse,
) -> PassResult:
    """Turn send and arrival times into throughput and latency figures."""
    first = spec.indices.start
    ordered = sorted(arrivals.items())
    latencies_ms = [(arrived - sent_s[i - first]) * 1000 for i, arrived in ordered]
    last_arrival_s = max(arrivals.values(), default=sent_s[-1])
    messages_per_observation = len(sent_s) / max(len(spec.expected), 1)

    return PassResult(
        name=spec.name,
        target_per_s=spec.rate_per_s,
        sent=len(sent_s),
        expected=len(spec.expected),
        observed=len(arrivals),
        duplicates=duplicates,
        send_s=sent_s[-1] - sent_s[0],
        e2e_s=last_arrival_s - sent_s[0],
        steady_per_s=steady_rate(sorted(arrivals.values())) * messages_per_observation,
        latencies_ms=latencies_ms,
        drift_ms=drift_ms(latencies_ms),
        cpu=cpu,
    )


def steady_rate(arrivals_s: list[float]) -> float:
    """Return arrivals per second between the 10th and 90th percentile arrival."""
    if len(arrivals_s) < 10:
        return 0.0
    low, high = len(arrivals_s) // 10, len(arrivals_s) * 9 // 10
    span_s = arrivals_s[high] - arrivals_s[low]
    return (high - low) / span_s if span_s > 0 else 0.0


def drift_ms(latencies_ms: list[float]) -> float:
    """Return the median latency of the last tenth minus that of the first."""
    tenth = len(latencies_ms) // 10
    if tenth == 0:
        return 0.0
    return percentile(latencies_ms[-tenth:], 50) - percentile(latencies_ms[:tenth], 50)


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the nearest-rank percentile of ``values``, NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- raw passthrough ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawLoad:
    """Real garage lines copied from topic A to topic B, indexed in a header."""

    source: str
    target: str
    partitions: int
    payloads: list[bytes]

    def spec(
        self, name: str, indices: range, rate_per_s: float | None, pid: int | None
    ) -> PassSpec:
        """Describe a raw pass over ``indices``."""
        return PassSpec(
            name=name,
            topic=self.source,
            read_topic=self.target,
            partitions=self.partitions,
            mode="header",
            prefix="",
            indices=indices,
            expected=frozenset(indices),
            rate_per_s=rate_per_s,
            make_record=self.record,
            sut_pid=pid,
        )

    def record(self, index: int) -> RecordParts:
        """Return record ``index``: a garage line, its index in a header."""
        header = (INDEX_HEADER, str(index).encode())
        return None, self.payloads[index % len(self.payloads)], [header]


async def run_raw(
    ctx: RunContext, cfg: BenchConfig, *, name: str, rate_per_s: float | None
) -> PassResult:
    """Measure the raw passthrough A -> B, on topics of its own."""
    suffix = uuid.uuid4().hex[:4]
    source, target = f"{ctx.run_id}.raw-a-{suffix}", f"{ctx.run_id}.raw-b-{suffix}"
    await create_topics(cfg.bootstrap, [source, target], ctx.partitions)
    payloads = [orjson.dumps(line) for line in load_templates(garage_path())[:200]]
    load = RawLoad(source, target, ctx.partitions, payloads)

    tap = TapArgs(cfg.bootstrap, source, target, ctx.partitions)
    passthrough = Child(passthrough_process, tap)
    try:
        passthrough.wait_ready()
        indices = range(_paced_count(cfg, rate_per_s))
        spec = load.spec(name, indices, rate_per_s, passthrough.pid)
        async with started_producer(cfg.bootstrap) as producer:
            return await run_pass(spec, cfg, producer)
    finally:
        passthrough.stop()


def _paced_count(cfg: BenchConfig, rate_per_s: float | None) -> int:
    if rate_per_s is None:
        return cfg.count
    return max(1, min(cfg.count, int(rate_per_s * cfg.paced_max_s)))


# -- the worker ---------------------------------------------------------------


def start_worker(ctx: RunContext, cfg: BenchConfig) -> Worker:
    """Start one worker; its output goes to ``<tmp>/worker.log``."""
    web_port = free_port()
    env = os.environ | {
        "AGGREGATOR_APP_ID": ctx.run_id,
        "AGGREGATOR_DATA_DIR": str(ctx.tmp_dir / "data"),
        "AGGREGATOR_RULES": str(ctx.rules_path),
        "AGGREGATOR_TOPIC_PREFIX": "",
        "AGGREGATOR_WEB_PORT": str(web_port),
        "AGGREGATOR_GUARANTEE": cfg.guarantee,
        "KAFKA_BOOTSTRAP": cfg.bootstrap,
    }
    log_path = ctx.tmp_dir / "worker.log"
    command = [str(VENV_BIN / "faust"), "-A", "aggregator_app", "worker"]

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "-l", cfg.log_level],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(process, web_port, log_path)
    atexit.register(stop_worker, worker)
    return worker


def stop_worker(worker: Worker) -> None:
    """Stop the worker: SIGTERM, then SIGKILL if it does not exit in time."""
    process = worker.process
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(WORKER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def log_tail(worker: Worker, lines: int = 30) -> str:
    """Return the end of the worker's log."""
    text = (
        worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
    )
    return "\n".join(text.splitlines()[-lines:])


def check_alive(worker: Worker) -> None:
    """Raise if the worker has exited, with the end of its log.

    Raises:
        RuntimeError: the worker is not running.
    """
    code = worker.process.poll()
    if code is not None:
        raise RuntimeError(f"worker exited: code={code}\n{log_tail(worker)}")


async def wait_ready(
    ctx: RunContext,
    cfg: BenchConfig,
    worker: Worker,
    producer: AIOKafkaProducer,
    template: dict[str, Any],
) -> float:
    """Send probes until one comes out as an observation; return seconds waited.

    Raises:
        RuntimeError: the worker exited, or no probe came out in time.
    """
    consumer = await assigned_consumer(
        cfg.bootstrap, ctx.aggregated_topic, partitions=ctx.partitions, from_end=True
    )
    prefix = f"{ctx.run_id}-probe-"
    start_s = time.monotonic()
    try:
        for attempt in range(int(WORKER_READY_TIMEOUT_S / PROBE_EVERY_S)):
            check_alive(worker)
            probe_id = f"{prefix}{attempt}"
            value = deepstream_payload(
                template, message_id=probe_id, object_id=probe_id, now_s=time.time()
            )
            await producer.send_and_wait(ctx.source_topic, value=value)
            batch = await consumer.getmany(timeout_ms=int(PROBE_EVERY_S * 1000))
            values = (r.value or b"" for records in batch.values() for r in records)
            if any(prefix.encode() in value for value in values):
                return time.monotonic() - start_s
    finally:
        await consumer.stop()
    raise RuntimeError(
        f"worker not ready in {WORKER_READY_TIMEOUT_S} s\n{log_tail(worker)}"
    )


def worker_stage_means_ms(worker: Worker) -> dict[str, float]:
    """Return the mean of each stage latency the worker measured, in ms.

    Each stage is weighted by records (a batch counts once per record).
    """
    url = f"http://127.0.0.1:{worker.web_port}/aggregator/metrics/"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}

    totals: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            head = f'aggregator_stage_latency_seconds_{part}{{stage="'
            if line.startswith(head):
                stage, _, value = line[len(head) :].partition('"} ')
                totals[(stage, part)] = float(value)
    return {
        stage: round(1000 * total / totals[(stage, "count")], 2)
        for (stage, part), total in totals.items()
        if part == "sum" and totals.get((stage, "count"))
    }


def worker_counts(worker: Worker) -> dict[str, Any]:
    """Return the worker's counters from its web view (empty if it does not answer)."""
    url = f"http://127.0.0.1:{worker.web_port}/aggregator/counts/"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            counts: dict[str, Any] = json.loads(response.read())
            return counts
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True, slots=True)
class PipelineLoad:
    """The planned DeepStream messages of a run, and the worker they go to."""

    ctx: RunContext
    plan: list[BenchMessage]
    templates: list[dict[str, Any]]
    worker_pid: int

    def spec(self, name: str, indices: range, rate_per_s: float | None) -> PassSpec:
        """Describe a pipeline pass over ``plan[indices]``."""
        return PassSpec(
            name=name,
            topic=self.ctx.source_topic,
            read_topic=self.ctx.aggregated_topic,
            partitions=self.ctx.partitions,
            mode="open",
            prefix=f"{self.ctx.run_id}-",
            indices=indices,
            expected=frozenset(i for i in indices if self.plan[i].kept),
            rate_per_s=rate_per_s,
            make_record=self.record,
            sut_pid=self.worker_pid,
        )

    def record(self, index: int) -> RecordParts:
        """Return the record of message ``index``, stamped now."""
        message = self.plan[index]
        template = self.templates[message.template]
        value = deepstream_payload(
            template,
            message_id=f"{self.ctx.run_id}-{index:08d}",
            object_id=message.object_id,
            now_s=time.time(),
        )
        return template["sensor"]["id"].encode(), value, []


# -- profiling ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profile:
    """Samples of a py-spy raw profile, by thread and by frame."""

    threads: Counter[str]
    waiting: Counter[str]
    busy_counts: Counter[str]
    self_counts: Counter[str]
    total_counts: Counter[str]


#: Innermost frames that only wait: a thread in them is idle, not busy.
WAIT_FRAMES: Final = (
    "EpollSelector.select ",
    "Condition.wait ",
    "Event.wait ",
    "_worker (concurrent/futures/thread.py)",
    "Queue.get ",
    "Thread.join ",
    "sleep ",
)


async def start_profile(
    pid: int, seconds: int, out: Path
) -> asyncio.subprocess.Process:
    """Start py-spy on the worker's python process (all threads, 100 Hz)."""
    command = [str(VENV_BIN / "py-spy"), "record", "-p", str(pid), "-d", str(seconds)]
    return await asyncio.create_subprocess_exec(
        *command,
        "-f",
        "raw",
        "-o",
        str(out),
        "--threads",
        *(["--idle"] if os.environ.get("BENCH_PROFILE_IDLE") else []),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def read_profile(raw: Path) -> Profile:
    """Read py-spy's raw (collapsed) output, recorded with ``--threads``.

    The first element of a stack names its thread. A frame is
    ``function (file)``: line numbers are dropped, so that all lines of one
    function add up. A stack whose innermost frame only waits (see
    :data:`WAIT_FRAMES`) counts for its thread but not among the frames.
    """
    profile = Profile(Counter(), Counter(), Counter(), Counter(), Counter())
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        thread, *frames = stack.split(";")
        _add_stack(
            profile,
            _thread_name(thread),
            [_frame_name(f) for f in frames],
            int(count_text),
        )
    return profile


def _add_stack(profile: Profile, thread: str, frames: list[str], count: int) -> None:
    profile.threads[thread] += count
    if not frames or frames[-1].startswith(WAIT_FRAMES):
        profile.waiting[thread] += count
        return
    profile.busy_counts[thread] += count
    profile.self_counts[frames[-1]] += count
    for frame in set(frames):
        profile.total_counts[frame] += count


def _thread_name(thread: str) -> str:
    # "thread (25196): MainThread" -> "MainThread (25196)"
    ident, _, name = thread.removeprefix("thread (").partition("):")
    return f"{name.strip() or 'thread'} ({ident})"


def _frame_name(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
        path = path.split(marker, 1)[-1]
    return f"{name} ({path})" if path else name


def print_profile(profile: Profile, *, limit: int = 25) -> None:
    """Print samples per thread, then the top frames by self and by total time.

    Frame shares are of the busy samples (those not waiting).
    """
    total = max(sum(profile.threads.values()), 1)
    busy = max(sum(profile.busy_counts.values()), 1)
    print(f"\nprofile of the worker: samples={total} busy={busy} (py-spy, 100 Hz)")
    print("  share   busy  thread")
    for thread, count in profile.threads.most_common():
        busy_share = profile.busy_counts[thread] / total
        print(f"  {count / total:6.1%}  {busy_share:6.1%}  {thread}")

    for title, counts in (
        ("self", profile.self_counts),
        ("total", profile.total_counts),
    ):
        print(f"\ntop {limit} frames by {title} time, % of busy samples (self, total):")
        for frame, _count in counts.most_common(limit):
            self_share = profile.self_counts[frame] / busy
            total_share = profile.total_counts[frame] / busy
            print(f"  {self_share:6.1%}  {total_share:6.1%}  {frame}")


async def profiled_pass(
    spec: PassSpec, cfg: BenchConfig, producer: AIOKafkaProducer, out: Path
) -> PassResult:
    """Run a pass with py-spy on the worker; print its profile."""
    assert spec.sut_pid is not None
    spy = await start_profile(spec.sut_pid, cfg.profile_s, out)
    result = await run_pass(spec, cfg, producer)
    _, stderr = await spy.communicate()

    if spy.returncode != 0 or not out.exists():
        detail = stderr.decode(errors="replace")[-500:]
        print(f"py-spy failed: code={spy.returncode} {detail}")
        return result
    kept = Path(tempfile.gettempdir()) / out.name
    shutil.copy(out, kept)
    print(f"\nraw profile kept: {kept}")
    print_profile(read_profile(out))
    return result


# -- the report ---------------------------------------------------------------

_COLUMNS: Final = (
    ("pass", 18),
    ("target/s", 8),
    ("sent", 6),
    ("seen", 11),
    ("in/s", 7),
    ("e2e/s", 7),
    ("steady/s", 8),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("max ms", 7),
    ("drift ms", 8),
    ("msg/cpu-s", 9),
    ("host", 5),
    ("sut", 5),
    ("main", 5),
    ("threads", 7),
    ("bench", 5),
    ("kafka", 5),
    ("rest", 5),
)

_LEGEND: Final = """
  target/s  paced rate of the pass, or max (flat out)
  in/s      messages produced per second (first to last send)
  e2e/s     messages fully processed per second, first send to last observation
  steady/s  processing rate once running: observations per second between the
            10th and 90th percentile arrival, scaled to messages (repeats too)
  p50/p99/max ms  send -> observation read back (committed records only)
  drift ms  median latency of the last tenth minus the first: > 0, a queue grows
  msg/cpu-s messages processed per CPU second of the SUT's main thread: the
            cost per message, which other load on the host disturbs less
  CPU, in % of one core (the host has 200%): host = all busy CPU; sut = the
            system under test (passthrough process, or worker); main = its
            main thread; threads = its two busiest other threads; bench = this
            bench's producer and reader; kafka = the broker; rest = everything
            else on the host (other sessions' processes)."""


def print_parameters(cfg: BenchConfig, ctx: RunContext) -> None:
    """Print what is run, with which settings."""
    overrides = {name: os.environ[name] for name in FAUST_ENV if name in os.environ}
    print(f"\nbench {ctx.run_id}: cpus={os.cpu_count()} bootstrap={cfg.bootstrap}")
    print(
        f"  messages per pass={cfg.count} guarantee={cfg.guarantee} "
        f"repeat_ratio={cfg.repeat_ratio} partitions={ctx.partitions} "
        f"worker log level={cfg.log_level} profile={cfg.profile}"
    )
    print(f"  settings from env: {overrides or 'none'}")
    print(
        f"  before the run: load average {os.getloadavg()[0]:.2f}, other processes "
        f"busy {background_cpu_pct():.0f}% of one core"
    )


def background_cpu_pct(sample_s: float = 1.0) -> float:
    """Return the host's busy CPU over ``sample_s`` while this run is idle."""
    before = cpu_sample(None)
    time.sleep(sample_s)
    return cpu_use(before, cpu_sample(None), None).host_pct


def print_results(results: list[PassResult]) -> None:
    """Print one row per pass, and the legend."""
    widths = [width for _title, width in _COLUMNS]
    print()
    print(_line([title for title, _width in _COLUMNS], widths))
    for result in results:
        print(_line(_row(result), widths))
    print(_LEGEND)


def _line(cells: list[str], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = (
        cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)
    )
    return " ".join([first, *rest])


def _row(result: PassResult) -> list[str]:
    target = "max" if result.target_per_s is None else f"{result.target_per_s:.0f}"
    seen = f"{result.observed}/{result.expected}"
    others = "/".join(f"{pct:.0f}" for pct in result.cpu.other_threads_pct)
    return [
        result.name,
        target,
        str(result.sent),
        seen,
        f"{result.in_per_s:.0f}",
        f"{result.processed_per_s:.0f}",
        f"{result.steady_per_s:.0f}",
        f"{percentile(result.latencies_ms, 50):.0f}",
        f"{percentile(result.latencies_ms, 99):.0f}",
        f"{max(result.latencies_ms, default=float('nan')):.0f}",
        f"{result.drift_ms:+.0f}",
        f"{result.per_main_cpu_s:.0f}",
        f"{result.cpu.host_pct:.0f}",
        f"{result.cpu.sut_pct:.0f}",
        f"{result.cpu.main_thread_pct:.0f}",
        others or "-",
        f"{result.cpu.bench_pct:.0f}",
        f"{result.cpu.broker_pct:.0f}",
        f"{result.cpu.rest_pct:.0f}",
    ]


def print_summary(results: dict[str, PassResult], notes: dict[str, Any]) -> None:
    """Print the ratio, the verdict at the paced rate, and what the worker said."""
    raw, pipe = results.get("raw flat-out"), results.get("pipeline flat-out")
    if raw and pipe and raw.steady_per_s > 0:
        ratio = pipe.steady_per_s / raw.steady_per_s
        print(
            f"\npipeline/raw, steady rate: {ratio:.3f} "
            f"({pipe.steady_per_s:.0f} / {raw.steady_per_s:.0f} per s)"
        )
    paced = results.get("pipeline paced")
    if paced is not None and paced.target_per_s:
        keeps_up = (
            paced.processed_per_s >= 0.95 * paced.target_per_s and paced.drift_ms < 100
        )
        p99_ms = percentile(paced.latencies_ms, 99)
        print(
            f"worker keeps up at {paced.target_per_s:.0f}/s: "
            f"{'yes' if keeps_up else 'no'} (p99 {p99_ms:.0f} ms; target: "
            f"{TARGET_PER_S}/s with p99 < {TARGET_P99_MS} ms)"
        )
    for name, value in notes.items():
        print(f"{name}: {value}")


# -- the run ------------------------------------------------------------------


async def run_pipeline(
    cfg: BenchConfig,
    *,
    name: str,
    count: int,
    rate_per_s: float | None,
) -> tuple[PassResult, dict[str, Any]]:
    """Run one pipeline pass against a worker of its own, on topics of its own.

    A fresh worker per pass: the paced pass never inherits the backlog of the
    flat-out one, however slow the worker is.
    """
    ctx = make_context(cfg)
    topics = [ctx.source_topic, ctx.aggregated_topic, ctx.dead_letter_topic]
    await create_topics(cfg.bootstrap, topics, ctx.partitions)
    templates = load_templates(garage_path())
    plan = plan_messages(
        count,
        templates=len(templates),
        repeat_ratio=cfg.repeat_ratio,
        seed=cfg.seed,
        run_id=ctx.run_id,
    )

    worker = start_worker(ctx, cfg)
    try:
        load = PipelineLoad(ctx, plan, templates, worker.process.pid)
        async with started_producer(cfg.bootstrap) as producer:
            return await _pipeline_pass(
                load, cfg, producer, worker, name=name, rate_per_s=rate_per_s
            )
    finally:
        stop_worker(worker)
        await cleanup(ctx, cfg)


async def _pipeline_pass(
    load: PipelineLoad,
    cfg: BenchConfig,
    producer: AIOKafkaProducer,
    worker: Worker,
    *,
    name: str,
    rate_per_s: float | None,
) -> tuple[PassResult, dict[str, Any]]:
    ready_s = await wait_ready(load.ctx, cfg, worker, producer, load.templates[0])
    notes: dict[str, Any] = {
        "run": load.ctx.run_id,
        "worker ready after s": round(ready_s, 1),
    }

    spec = load.spec(name, range(len(load.plan)), rate_per_s)
    if cfg.profile and rate_per_s is None:
        profile_out = load.ctx.tmp_dir / f"{load.ctx.run_id}-profile.txt"
        result = await profiled_pass(spec, cfg, producer, profile_out)
    else:
        result = await run_pass(spec, cfg, producer)
    check_alive(worker)

    notes["worker counts"] = await asyncio.to_thread(worker_counts, worker)
    notes["stage mean ms"] = await asyncio.to_thread(worker_stage_means_ms, worker)
    return result, notes


def _auto_rate(flat: PassResult) -> float:
    return max(50.0, round(flat.steady_per_s * AUTO_RATE_SHARE, -1))


async def bench(cfg: BenchConfig) -> int:
    """Run every pass and print the report; return the exit code."""
    ctx = make_context(cfg)
    print_parameters(cfg, ctx)
    results: dict[str, PassResult] = {}
    notes: dict[str, Any] = {}
    try:
        results["raw flat-out"] = await run_raw(
            ctx, cfg, name="raw flat-out", rate_per_s=None
        )
        flat, notes["pipeline flat-out"] = await run_pipeline(
            cfg, name="pipeline flat-out", count=cfg.count, rate_per_s=None
        )
        results[flat.name] = flat

        rate_per_s = cfg.rate_per_s or _auto_rate(flat)
        paced, notes["pipeline paced"] = await run_pipeline(
            cfg,
            name="pipeline paced",
            count=_paced_count(cfg, rate_per_s),
            rate_per_s=rate_per_s,
        )
        results[paced.name] = paced
        results["raw paced"] = await run_raw(
            ctx, cfg, name="raw paced", rate_per_s=rate_per_s
        )
    finally:
        await cleanup(ctx, cfg)

    print_results(list(results.values()))
    print_summary(results, notes)
    return 0


async def cleanup(ctx: RunContext, cfg: BenchConfig) -> None:
    """Delete the run's topics and data dir, unless ``--keep``."""
    if cfg.keep:
        print(f"kept: topics {ctx.run_id}* and {ctx.tmp_dir}")
        return
    try:
        await delete_run_topics(cfg.bootstrap, ctx.run_id)
    except (KafkaError, OSError) as exc:
        print(f"could not delete topics {ctx.run_id}*: {exc!r}")
    shutil.rmtree(ctx.tmp_dir, ignore_errors=True)


def _rate(text: str) -> float | None:
    return None if text == "auto" else float(text)


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Raw aiokafka passthrough against the whole pipeline, once."
    )
    add = parser.add_argument
    add("-n", "--count", type=int, default=20_000, help="messages per flat-out pass")
    add(
        "--guarantee",
        choices=("at_least_once",),
        default="at_least_once",
    )
    add("--rate", type=_rate, default=None, help="paced passes, messages/s, or auto")
    add("--repeat-ratio", type=float, default=0.0, help="share of repeat messages")
    add("--seed", type=int, default=1, help="seed of the repeats")
    add("--profile", action="store_true", help="py-spy the worker, flat-out pass")
    add("--profile-s", type=int, default=15, help="py-spy duration")
    add("--paced-max-s", type=float, default=20.0, help="longest paced pass")
    add("--pass-timeout-s", type=float, default=90.0, help="longest wait per pass")
    add("--log-level", default="warn", help="the worker's -l")
    add("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092"))
    add("--keep", action="store_true", help="keep the topics and the data dir")
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
        pass_timeout_s=args.pass_timeout_s,
        log_level=args.log_level,
        keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark once; the worker is stopped whatever happens."""
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return asyncio.run(bench(cfg))


if __name__ == "__main__":
    sys.exit(main())
