"""Fixtures of the integration layer: the real Kafka broker, ClickHouse and workers.

The broker is at ``KAFKA_BOOTSTRAP`` (default ``localhost:9092``, started by
``scripts/kafka.sh start``), the ClickHouse server at ``CLICKHOUSE_TEST_URL``
(default ``clickhouse://127.0.0.1:9000``, ``scripts/clickhouse.sh start``).
When either does not answer, the tests that need it fail if ``CI`` is set and
are skipped otherwise.

``worker_factory`` starts ``faust -A aggregator_app worker`` as a subprocess
with a run of its own: consumer group, topic prefix, data directory, web port
and store database are new for every worker (the API token, :data:`API_TOKEN`,
is one for the session), so that tests never see each
other's records. A failing test prints the tail of its workers' logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from clickhouse_driver import Client

from aggregator_app.exceptions import AggregatorError
from aggregator_app.ingest import REPLAY_HEADER
from aggregator_app.timeparse import to_epoch_ms

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092")
CLICKHOUSE_TEST_URL = os.environ.get(
    "CLICKHOUSE_TEST_URL", "clickhouse://127.0.0.1:9000"
)

#: The API token every test worker asks for (``AGGREGATOR_API_TOKEN``).
API_TOKEN = f"test-{uuid.uuid4().hex}"
WORKER_READY_TIMEOUT_S = 90.0
WORKER_STOP_TIMEOUT_S = 30.0
_POLL_INTERVAL_S = 0.25
_HTTP_TIMEOUT_S = 5.0
_LOG_TAIL_LINES = 120

_PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()

WorkerFactory = Callable[..., "WorkerHandle"]
SendDetections = Callable[..., list[RecordMetadata]]
ReadTopic = Callable[..., list[ConsumerRecord]]


# Test outcome, for the log tails.


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_PHASE_REPORTS, {})[report.when] = report
    return report


def _test_failed(item: pytest.Item) -> bool:
    reports = item.stash.get(_PHASE_REPORTS, {})
    return any(report.failed for report in reports.values())


# Servers.


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Return the broker's bootstrap servers, or fail (CI) / skip (locally)."""

    async def probe() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=KAFKA_BOOTSTRAP, request_timeout_ms=5000
        )
        await producer.start()
        await producer.stop()

    try:
        asyncio.run(probe())
    except (KafkaError, OSError) as exc:
        _unavailable(
            f"no Kafka broker at {KAFKA_BOOTSTRAP} ({exc!r}); "
            "start one with scripts/kafka.sh start"
        )
    return KAFKA_BOOTSTRAP


def _clickhouse_address() -> tuple[str, int]:
    host_port = CLICKHOUSE_TEST_URL.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    return host, int(port or 9000)


@pytest.fixture(scope="session")
def clickhouse_server() -> tuple[str, int]:
    """Return the ClickHouse server's address, or fail (CI) / skip (locally)."""
    host, port = _clickhouse_address()
    client = Client(host=host, port=port, connect_timeout=2)
    try:
        client.execute("SELECT 1")
    except Exception as exc:  # any driver error means: no usable server
        _unavailable(
            f"no ClickHouse server at {host}:{port} ({exc!r}); "
            "start one with scripts/clickhouse.sh start"
        )
    finally:
        client.disconnect()
    return host, port


# Workers.


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


class WorkerHandle:
    """One ``faust worker`` process of a run; restartable with the same env.

    Attributes:
        env: the environment the process runs with.
        run_id: the ``t-<uuid8>`` part of its group id and topic prefix.
        database: its ClickHouse database, or ``None`` for embedded chdb.
        log_paths: the log of every process started, oldest first.
    """

    def __init__(
        self,
        *,
        env: dict[str, str],
        run_id: str,
        log_dir: Path,
        clickhouse: tuple[str, int] | None,
        database: str | None,
    ) -> None:
        self.env = env
        self.run_id = run_id
        self.log_dir = log_dir
        self.clickhouse = clickhouse
        self.database = database
        self.log_paths: list[Path] = []
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the base URL of the worker's web port."""
        return f"http://127.0.0.1:{self.env['AGGREGATOR_WEB_PORT']}"

    @property
    def token(self) -> str | None:
        """Return the API token the worker was given, if any."""
        return self.env.get("AGGREGATOR_API_TOKEN") or None

    @property
    def auth_headers(self) -> dict[str, str]:
        """Return the headers that carry the worker's token."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def prefix(self) -> str:
        """Return the prefix of the run's topic names."""
        return self.env["AGGREGATOR_TOPIC_PREFIX"]

    @property
    def app_id(self) -> str:
        """Return the app id, which is also the consumer group id."""
        return self.env["AGGREGATOR_APP_ID"]

    @property
    def pid(self) -> int | None:
        """Return the running process's id, if one runs."""
        return None if self._process is None else self._process.pid

    def topic(self, name: str) -> str:
        """Return the full name of a topic of the rules file."""
        return f"{self.prefix}{name}"

    def internal_topic(self, name: str) -> str:
        """Return the full name of a topic the app names after its id."""
        return f"{self.app_id}-{name}"

    def start(self, *, ready_timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
        """Start a process and wait until it has partitions assigned."""
        assert not self.running(), "the worker is already running"
        log_path = self.log_dir / f"worker-{len(self.log_paths) + 1}.log"
        self.log_paths.append(log_path)
        with log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    str(REPO_ROOT / ".venv/bin/faust"),
                    "-A",
                    "aggregator_app",
                    "worker",
                    "-l",
                    "info",
                ],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_until(
            lambda counts: counts.get("assigned_partitions", 0) > 0,
            timeout_s=ready_timeout_s,
            what="partitions assigned",
        )

    def running(self) -> bool:
        """Return whether the current process is alive."""
        return self._process is not None and self._process.poll() is None

    def counts(self) -> dict[str, Any]:
        """Return ``GET /aggregator/counts/``."""
        return _get_json(f"{self.url}/aggregator/counts/")

    def summary(self) -> dict[str, Any]:
        """Return ``GET /aggregator/summary/`` (counters and stored rows)."""
        return _get_json(f"{self.url}/aggregator/summary/")

    def wait_until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout_s: float,
        what: str,
        summary: bool = False,
    ) -> dict[str, Any]:
        """Poll the counts (or the summary) until ``predicate`` holds; return them.

        Fails the test when the process exits or ``timeout_s`` passes first.
        """
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not self.running():
                code = None if self._process is None else self._process.returncode
                pytest.fail(f"worker exited (code {code}) while waiting for {what}")
            try:
                last = self.summary() if summary else self.counts()
            except (urllib.error.URLError, OSError, ValueError):
                last = {}
            if last and predicate(last):
                return last
            time.sleep(_POLL_INTERVAL_S)
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last: {last}")

    def stop(self, *, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int:
        """Send SIGTERM and wait for the process; return its exit code."""
        process = self._require_process()
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"worker did not stop within {timeout_s} s of SIGTERM")

    def kill(self) -> None:
        """Send SIGKILL and wait for the process."""
        process = self._require_process()
        process.kill()
        process.wait()

    def restart(self, **env_overrides: str) -> None:
        """Start a new process with the same env (plus overrides) once stopped."""
        assert not self.running(), "stop or kill the worker before restarting it"
        self.env.update(env_overrides)
        self.start()

    def lag(self) -> int:
        """Return the group's lag over the detector topic and ``detector-events``.

        Counts records not yet committed by the consumer group; 0 once both
        agents have handled and committed everything sent so far.
        """
        topics = [
            self.topic("detections.deepstream"),
            self.internal_topic("detector-events"),
        ]
        return asyncio.run(_group_lag(self.env["KAFKA_BOOTSTRAP"], self.app_id, topics))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a query on the worker's ClickHouse server database."""
        assert self.clickhouse is not None, "the worker uses embedded chdb"
        host, port = self.clickhouse
        client = Client(host=host, port=port, database=self.database)
        try:
            rows: list[tuple[Any, ...]] = client.execute(sql)
        finally:
            client.disconnect()
        return rows

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last lines of every process's log."""
        parts = []
        for path in self.log_paths:
            text = path.read_text(errors="replace") if path.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"----- {path} (last {lines} lines) -----\n{tail}")
        return "\n".join(parts)

    def close(self) -> None:
        """Kill the process if it still runs."""
        if self.running():
            self.kill()

    def _require_process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, "the worker was never started"
        return self._process


async def _partitions(bootstrap: str, topics: Sequence[str]) -> list[TopicPartition]:
    """Return the partitions of the topics that exist, in order."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return sorted(
        TopicPartition(topic["topic"], partition["partition"])
        for topic in described
        if topic["error_code"] == 0
        for partition in topic["partitions"]
    )


async def _group_lag(bootstrap: str, group_id: str, topics: Sequence[str]) -> int:
    partitions = await _partitions(bootstrap, topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id)
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
        await admin.close()

    lag = 0
    for tp in partitions:
        meta = committed.get(tp)
        position = 0 if meta is None or meta.offset < 0 else meta.offset
        lag += ends[tp] - position
    return lag


@pytest.fixture
def worker_factory(
    request: pytest.FixtureRequest, tmp_path: Path, kafka_bootstrap: str
) -> Iterator[WorkerFactory]:
    """Start workers, each with a run of its own; kill them all at teardown.

    ``worker_factory(store="server", **env_overrides)`` returns a started,
    ready :class:`WorkerHandle`. ``store="server"`` gives the worker a fresh
    database ``t_<uuid8>`` on the ClickHouse server (the worker creates it;
    it is dropped at teardown), ``store="embedded"`` an embedded chdb in the
    test's tmp dir. ``env_overrides`` are set last.
    """
    handles: list[WorkerHandle] = []
    databases: list[tuple[tuple[str, int], str]] = []

    def make(*, store: str = "server", **env_overrides: str) -> WorkerHandle:
        run = uuid.uuid4().hex[:8]
        run_dir = tmp_path / f"run-{run}"
        run_dir.mkdir()
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP=kafka_bootstrap,
            AGGREGATOR_APP_ID=f"t-{run}",
            AGGREGATOR_TOPIC_PREFIX=f"t-{run}.",
            AGGREGATOR_DATA_DIR=str(run_dir / "data"),
            AGGREGATOR_WEB_PORT=str(_free_port()),
            AGGREGATOR_API_TOKEN=API_TOKEN,
        )

        clickhouse: tuple[str, int] | None = None
        database: str | None = None
        if store == "server":
            clickhouse = request.getfixturevalue("clickhouse_server")
            database = f"t_{run}"
            databases.append((clickhouse, database))
            host, port = clickhouse
            env["CLICKHOUSE_URL"] = f"clickhouse://{host}:{port}/{database}"
        elif store == "embedded":
            env["CLICKHOUSE_URL"] = f"chdb://{run_dir / 'chdb'}"
        else:
            raise ValueError(f"store must be server or embedded, not {store!r}")
        env.update(env_overrides)

        handle = WorkerHandle(
            env=env,
            run_id=f"t-{run}",
            log_dir=run_dir,
            clickhouse=clickhouse,
            database=database,
        )
        handles.append(handle)
        handle.start()
        return handle

    yield make

    for handle in handles:
        handle.close()
    if _test_failed(request.node):
        for handle in handles:
            print(f"\n===== worker {handle.run_id} =====\n{handle.log_tail()}")
    for (host, port), database in databases:
        client = Client(host=host, port=port)
        try:
            client.execute(f"DROP DATABASE IF EXISTS `{database}`")
        finally:
            client.disconnect()
    asyncio.run(_delete_run_topics(kafka_bootstrap, [h.run_id for h in handles]))


async def _delete_run_topics(bootstrap: str, run_ids: Sequence[str]) -> None:
    """Delete the topics of these runs: ``<run>.<name>`` and ``<run>-<name>``."""
    prefixes = tuple(f"{run_id}{sep}" for run_id in run_ids for sep in ".-")
    if not prefixes:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = [
            name for name in await admin.list_topics() if name.startswith(prefixes)
        ]
        if topics:
            await admin.delete_topics(topics)
    finally:
        await admin.close()


# Records.


def deepstream_key_and_time(payload: bytes) -> tuple[bytes | None, int | None]:
    """Return a DeepStream message's camera id and event time (epoch ms).

    Either is ``None`` when the payload does not say it readably; the
    message is then sent without it, as the replay tool does.
    """
    try:
        message = orjson.loads(payload)
        camera_id = message["sensor"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None, None
    key = camera_id.encode() if isinstance(camera_id, str) else None
    try:
        time_ms: int | None = to_epoch_ms(message["@timestamp"], naive="utc")
    except (AggregatorError, KeyError, TypeError, ValueError):
        time_ms = None
    return key, time_ms


@pytest.fixture
def send_detections(kafka_bootstrap: str) -> SendDetections:
    """Send DeepStream payloads to a topic, byte for byte, in order.

    ``send_detections(topic, payloads, *, replayed=True, copies=1)`` keys each
    record by its camera id (``sensor.id``) with its event time as the record
    timestamp, adds the replay header when ``replayed``, and sends each
    payload ``copies`` times in a row. Returns the metadata of every record
    sent, in send order.
    """

    async def send(
        topic: str, payloads: Sequence[bytes], replayed: bool, copies: int
    ) -> list[RecordMetadata]:
        headers = [(REPLAY_HEADER, b"1")] if replayed else []
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=2 * 1024 * 1024,
        )
        await producer.start()
        try:
            futures = []
            for payload in payloads:
                key, time_ms = deepstream_key_and_time(payload)
                for _ in range(copies):
                    futures.append(
                        await producer.send(
                            topic,
                            value=payload,
                            key=key,
                            timestamp_ms=time_ms,
                            headers=headers,
                        )
                    )
            await producer.flush()
            return [await future for future in futures]
        finally:
            await producer.stop()

    def send_sync(
        topic: str,
        payloads: Sequence[bytes],
        *,
        replayed: bool = True,
        copies: int = 1,
    ) -> list[RecordMetadata]:
        return asyncio.run(send(topic, payloads, replayed, copies))

    return send_sync


@pytest.fixture
def read_topic(kafka_bootstrap: str) -> ReadTopic:
    """Read a whole topic from its beginning.

    ``read_topic(topic, *, count, timeout_s=30.0)`` waits until at least
    ``count`` records have been read or ``timeout_s`` has passed, then reads
    on to the end offsets of that moment, so that records beyond ``count``
    are returned too. Records come in (partition, offset) order, with headers.
    """

    async def read(topic: str, count: int, timeout_s: float) -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=8 * 1024 * 1024,
            max_partition_fetch_bytes=2 * 1024 * 1024,
        )
        await consumer.start()
        try:
            return await _read_all(
                consumer, kafka_bootstrap, topic, count=count, timeout_s=timeout_s
            )
        finally:
            await consumer.stop()

    def read_sync(
        topic: str, *, count: int, timeout_s: float = 30.0
    ) -> list[ConsumerRecord]:
        return asyncio.run(read(topic, count, timeout_s))

    return read_sync


async def _read_all(
    consumer: AIOKafkaConsumer,
    bootstrap: str,
    topic: str,
    *,
    count: int,
    timeout_s: float,
) -> list[ConsumerRecord]:
    deadline = time.monotonic() + timeout_s
    tps = await _partitions(bootstrap, [topic])
    while not tps and time.monotonic() < deadline:  # the topic may not exist yet
        await asyncio.sleep(_POLL_INTERVAL_S)
        tps = await _partitions(bootstrap, [topic])
    if not tps:
        return []

    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    records: list[ConsumerRecord] = []
    while len(records) < count and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for batch in batches.values():
            records.extend(batch)

    ends = await consumer.end_offsets(tps)
    drain_deadline = time.monotonic() + 10.0
    while time.monotonic() < drain_deadline:
        positions = [await consumer.position(tp) for tp in tps]
        if all(
            position >= ends[tp] for position, tp in zip(positions, tps, strict=True)
        ):
            break
        batches = await consumer.getmany(timeout_ms=500)
        for batch in batches.values():
            records.extend(batch)
    return sorted(records, key=lambda record: (record.partition, record.offset))
