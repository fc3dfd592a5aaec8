"""No stored row is lost: a worker killed after a commit, a ClickHouse outage.

Real worker processes, the real broker, and ClickHouse 18.16 servers: the
shared one, and for the outage a server of this test's own (started and
stopped here, in a temp dir, on ports of its own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_driver import Client

from aggregator_app.dedup import Deduplicator, MemorySpanStore
from aggregator_app.ingest import RawRecord, parse_record
from aggregator_app.timeparse import to_epoch_ms
from rules.config import load_rules

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GARAGE_FILE = REPO_ROOT / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl"
RULES = load_rules(REPO_ROOT / "config/aggregation-rules.yml")
DEEPSTREAM = next(source for source in RULES.sources if source.adapter == "deepstream")
CLICKHOUSE_CONFIG = REPO_ROOT / "scripts/clickhouse/config.xml"

PROCESS_TIMEOUT_S = 90.0
SERVER_START_TIMEOUT_S = 60.0


# Helpers.


@pytest.fixture(scope="module")
def garage_payloads() -> list[bytes]:
    """Return the first 600 messages of the garage recording."""
    lines = GARAGE_FILE.read_bytes().splitlines()
    return [line for line in lines if line.strip()][:600]


def expected_rows(payloads: list[bytes]) -> tuple[set[str], set[str]]:
    """Return the event ids and the ``open`` aggregated ids the store must hold."""
    deduplicator = Deduplicator(RULES.dedup, MemorySpanStore())
    event_ids: set[str] = set()
    open_ids: set[str] = set()
    for offset, payload in enumerate(payloads):
        message = orjson.loads(payload)
        record = RawRecord(
            value=payload,
            key=message["sensor"]["id"].encode(),
            topic=DEEPSTREAM.topic,
            partition=0,
            offset=offset,
            timestamp_ms=to_epoch_ms(message["@timestamp"], naive="utc"),
            replayed=True,
        )
        for event in parse_record(record, source=DEEPSTREAM, rules=RULES, now_ms=0):
            event_ids.add(event.event_id)
            if deduplicator.observe(event, 0).outcome == "kept":
                open_ids.add(f"{RULES.dedup.rule_id}:{event.event_id}")
    return event_ids, open_ids


def wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


def spooled_keys(data_dir: Path, table: str) -> set[str]:
    """Return the first column (the row key) of every spooled row of ``table``."""
    keys: set[str] = set()
    for path in (data_dir / "spool").glob(f"{table}*.jsonl"):
        for line in path.read_bytes().splitlines():
            keys.add(str(orjson.loads(line)[0]))
    return keys


def metrics(worker: Any) -> dict[str, float]:
    """Return the worker's unlabelled Prometheus samples by name."""
    with urllib.request.urlopen(f"{worker.url}/aggregator/metrics/") as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def health(worker: Any) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{worker.url}/aggregator/health/") as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# A worker killed right after it committed.


def test_rows_of_committed_events_survive_sigkill(
    worker_factory: Callable[..., Any],
    send_detections: Callable[..., Any],
    garage_payloads: list[bytes],
) -> None:
    event_ids, open_ids = expected_rows(garage_payloads)
    # Rows would wait a minute in the writer's buffer: only the commit barrier
    # gets them stored before the offsets are committed.
    worker = worker_factory(AGGREGATOR_STORE_FLUSH_MS="60000")
    send_detections(worker.topic("detections.deepstream"), garage_payloads)

    wait_for(lambda: worker.lag() == 0, timeout_s=PROCESS_TIMEOUT_S, what="lag 0")
    worker.kill()

    data_dir = Path(worker.env["AGGREGATOR_DATA_DIR"])
    stored = {row[0] for row in worker.query("SELECT event_id FROM detector_events")}
    spooled = spooled_keys(data_dir, "detector_events")
    assert event_ids - stored - spooled == set()
    opened = worker.query(
        "SELECT aggregated_id FROM aggregated_events WHERE status = 'open'"
    )
    stored_open = {row[0] for row in opened}
    assert open_ids - stored_open - spooled_keys(data_dir, "aggregated_events") == set()


# A ClickHouse outage.


class PrivateClickHouse:
    """A ClickHouse server of one test: its own data dir and ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tcp_port = _free_port()
        self.http_port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it answers."""
        server = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
        for name in ("data", "tmp", "user_files", "format_schemas", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        log = (self.root / "log" / "stdout.log").open("ab")
        self._process = subprocess.Popen(
            [
                server,
                f"--config-file={CLICKHOUSE_CONFIG}",
                "--",
                f"--path={self.root}/data/",
                f"--tmp_path={self.root}/tmp/",
                f"--user_files_path={self.root}/user_files/",
                f"--format_schema_path={self.root}/format_schemas/",
                f"--logger.log={self.root}/log/server.log",
                f"--logger.errorlog={self.root}/log/server.err.log",
                "--listen_host=127.0.0.1",
                f"--tcp_port={self.tcp_port}",
                f"--http_port={self.http_port}",
            ],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self._answers, timeout_s=SERVER_START_TIMEOUT_S, what="ClickHouse")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        client = Client(host="127.0.0.1", port=self.tcp_port, connect_timeout=2)
        try:
            rows: list[tuple[Any, ...]] = client.execute(sql)
        finally:
            client.disconnect()
        return rows

    def stop(self) -> None:
        """Stop the server this object started, if it runs."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _answers(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            pytest.fail(f"ClickHouse exited: code={self._process.returncode}")
        try:
            return self.query("SELECT 1") == [(1,)]
        except Exception:  # any driver or socket error: not up yet
            return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def private_clickhouse(
    tmp_path: Path, clickhouse_server: tuple[str, int]
) -> Iterator[PrivateClickHouse]:
    """A server of this test alone, not started yet; stopped at teardown."""
    if not CLICKHOUSE_CONFIG.exists() or not (
        shutil.which("clickhouse-server")
        or os.path.exists("/usr/sbin/clickhouse-server")
    ):
        pytest.fail("clickhouse-server is not installed (scripts/clickhouse.sh start)")
    server = PrivateClickHouse(tmp_path / "clickhouse")
    yield server
    server.stop()


def test_worker_keeps_working_through_a_clickhouse_outage(
    worker_factory: Callable[..., Any],
    send_detections: Callable[..., Any],
    garage_payloads: list[bytes],
    private_clickhouse: PrivateClickHouse,
) -> None:
    event_ids, open_ids = expected_rows(garage_payloads)
    database = "outage"
    # Nothing listens on the server's port yet: the store is down from the start.
    worker = worker_factory(
        store="server",
        CLICKHOUSE_URL=f"clickhouse://127.0.0.1:{private_clickhouse.tcp_port}/{database}",
        AGGREGATOR_STORE_COMMIT_WAIT_MS="500",
    )
    send_detections(worker.topic("detections.deepstream"), garage_payloads)

    wait_for(lambda: worker.lag() == 0, timeout_s=PROCESS_TIMEOUT_S, what="lag 0")
    during = metrics(worker)
    status, body = health(worker)
    assert during["aggregator_received_total"] == len(garage_payloads)
    assert during["aggregator_store_backlog_rows"] >= len(event_ids)
    assert during["aggregator_store_rows_written_total"] == 0
    assert status == 503 and any("store" in problem for problem in body["problems"])
    with urllib.request.urlopen(f"{worker.url}/aggregator/summary/") as response:
        summary = json.loads(response.read())
    assert summary["stored"] == {} and summary["error"]
    assert summary["counts"]["received"] == len(garage_payloads)

    private_clickhouse.start()
    wait_for(
        lambda: metrics(worker)["aggregator_store_backlog_rows"] == 0,
        timeout_s=PROCESS_TIMEOUT_S,
        what="store backlog written",
    )

    table = f"`{database}`.detector_events"
    stored = {
        row[0] for row in private_clickhouse.query(f"SELECT event_id FROM {table}")
    }
    opened = private_clickhouse.query(
        f"SELECT aggregated_id FROM `{database}`.aggregated_events "
        "WHERE status = 'open' AND type = 'observation'"
    )
    assert stored == event_ids
    assert {row[0] for row in opened} == open_ids
    duplicates = private_clickhouse.query(
        f"SELECT count() - uniqExact(event_id) FROM {table}"
    )
    assert duplicates == [(0,)]
    wait_for(lambda: health(worker)[0] == 200, timeout_s=30, what="healthy again")
