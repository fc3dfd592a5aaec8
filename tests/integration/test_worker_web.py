"""The web port of real workers: routed table queries, health, metrics, retention.

Against the real broker and the shared ClickHouse 18.16 server.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from aggregator_app.dedup import Deduplicator, MemorySpanStore, dedup_keys
from aggregator_app.ingest import RawRecord, parse_record
from aggregator_app.schema import DetectorEvent
from aggregator_app.timeparse import to_epoch_ms
from aggregator_app.topics import partition_for_camera
from rules.config import load_rules

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GARAGE_FILE = REPO_ROOT / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl"
RULES = load_rules(REPO_ROOT / "config/aggregation-rules.yml")
DEEPSTREAM = next(source for source in RULES.sources if source.adapter == "deepstream")
PROCESS_TIMEOUT_S = 90.0
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def garage_payloads() -> list[bytes]:
    lines = GARAGE_FILE.read_bytes().splitlines()
    return [line for line in lines if line.strip()][:400]


def kept_events(payloads: list[bytes]) -> list[DetectorEvent]:
    """Return the events deduplication keeps, in send order."""
    deduplicator = Deduplicator(RULES.dedup, MemorySpanStore())
    kept = []
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
            partition = partition_for_camera(event.camera_id)
            if deduplicator.observe(event, partition).outcome == "kept":
                kept.append(event)
    return kept


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def join_worker(tmp_path: Path) -> Iterator[Callable[[Any], Any]]:
    """Start another worker of the same run (group, topics, store database)."""
    started: list[Any] = []

    def join(first: Any) -> Any:
        handle_type = type(first)
        run_dir = tmp_path / f"joined-{len(started)}"
        run_dir.mkdir()
        env = dict(first.env)
        env.update(
            AGGREGATOR_DATA_DIR=str(run_dir / "data"),
            AGGREGATOR_WEB_PORT=str(_free_port()),
        )
        handle = handle_type(
            env=env,
            run_id=first.run_id,
            log_dir=run_dir,
            clickhouse=first.clickhouse,
            database=first.database,
        )
        started.append(handle)
        handle.start()
        return handle

    yield join
    for handle in started:
        handle.close()


def port_of(url: str) -> int:
    return int(urllib.parse.urlsplit(url).port or 80)


def test_any_worker_answers_for_a_key_the_other_owns(
    worker_factory: Callable[..., Any],
    join_worker: Callable[[Any], Any],
    send_detections: Callable[..., Any],
    garage_payloads: list[bytes],
) -> None:
    # Each worker owns two of the four partitions once both run.
    first = worker_factory(BROKER_SESSION_TIMEOUT="10", BROKER_HEARTBEAT_INTERVAL="1")
    second = join_worker(first)
    wait_for(
        lambda: (
            first.counts()["assigned_partitions"] > 0
            and second.counts()["assigned_partitions"] > 0
            and first.counts()["assigned_partitions"]
            + second.counts()["assigned_partitions"]
            >= 2 * RULES.partitions
        ),
        timeout_s=PROCESS_TIMEOUT_S,
        what="partitions shared by both workers",
    )
    send_detections(first.topic("detections.deepstream"), garage_payloads)
    wait_for(lambda: first.lag() == 0, timeout_s=PROCESS_TIMEOUT_S, what="lag 0")

    # The latest kept event of every partition: its window is still held.
    latest: dict[int, DetectorEvent] = {}
    for event in kept_events(garage_payloads):
        latest[partition_for_camera(event.camera_id)] = event
    assert len(latest) == RULES.partitions

    served_by: dict[int, set[int]] = {}
    for partition, event in sorted(latest.items()):
        key, _ = dedup_keys(event, RULES.dedup)
        query = urllib.parse.urlencode({"key": key, "time_ms": event.event_time_ms})
        answers = [
            get_json(
                f"{worker.url}/aggregator/tables/dedup/?{query}", worker.auth_headers
            )
            for worker in (first, second)
        ]
        for status, body in answers:
            assert status == 200, body
            spans = [
                span for window in body["result"]["windows"] for span in window["spans"]
            ]
            assert event.event_id in [span["kept_id"] for span in spans]
            assert body["partition"] == partition
        assert answers[0] == answers[1]
        served_by.setdefault(port_of(answers[0][1]["served_by"]), set()).add(partition)

    # Both workers served some keys, whichever worker was asked.
    assert set(served_by) == {port_of(first.url), port_of(second.url)}
    status, old_address = get_json(
        f"{second.url}/aggregator/dedup/?"
        + urllib.parse.urlencode(
            {"key": dedup_keys(latest[0], RULES.dedup)[0], "time_ms": 0}
        ),
        second.auth_headers,
    )
    assert status == 200 and old_address["table"] == "dedup"

    # A request marked as forwarded, sent to a worker that does not hold the
    # key's partition, gets an error, not an empty answer.
    partition = min(served_by[port_of(first.url)])
    key, _ = dedup_keys(latest[partition], RULES.dedup)
    query = urllib.parse.urlencode({"key": key, "time_ms": 0})
    forged = urllib.request.Request(
        f"{second.url}/aggregator/tables/dedup/?{query}",
        headers={
            **first.auth_headers,
            "x-aggregator-routed-from": "http://elsewhere:1",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 503


def test_table_queries_validate_their_parameters(
    worker_factory: Callable[..., Any],
) -> None:
    worker = worker_factory()

    base = f"{worker.url}/aggregator/tables"
    auth = worker.auth_headers
    missing = get_json(f"{base}/dedup/?time_ms=1", auth)
    bad_time = get_json(f"{base}/dedup/?key=a%7Cb&time_ms=x", auth)
    unknown = get_json(f"{base}/nope/?key=a", auth)
    twice = get_json(f"{base}/dedup/?key=a%7Cb&time_ms=1&time_ms=2", auth)
    other_camera = get_json(f"{base}/dedup/?key=a%7Cb&time_ms=1&camera_id=zzz", auth)
    index = get_json(f"{base}/", auth)

    assert missing[0] == 400 and "key" in missing[1]["error"]
    assert bad_time[0] == 400 and "time_ms" in bad_time[1]["error"]
    assert unknown[0] == 404
    assert twice[0] == 400 and "time_ms" in twice[1]["error"]
    assert other_camera[0] == 400 and "camera_id" in other_camera[1]["error"]
    assert index[0] == 200
    assert sorted(index[1]) == ["correlation", "dedup", "episodes"]
    assert index[1]["dedup"]["params"] == ["key", "time_ms", "camera_id"]
    assert index[1]["correlation"]["params"] == ["site_id", "global_id"]
    assert index[1]["episodes"]["params"] == ["global_id"]


def parse_metrics(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_and_health_report_the_pipeline(
    worker_factory: Callable[..., Any],
    send_detections: Callable[..., Any],
    garage_payloads: list[bytes],
) -> None:
    worker = worker_factory()
    payloads = garage_payloads[:200]
    send_detections(worker.topic("detections.deepstream"), payloads, copies=2)
    wait_for(lambda: worker.lag() == 0, timeout_s=PROCESS_TIMEOUT_S, what="lag 0")
    wait_for(
        lambda: worker.counts()["store_backlog_rows"] == 0,
        timeout_s=PROCESS_TIMEOUT_S,
        what="rows stored",
    )

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"{worker.url}/aggregator/metrics/") as response:
            return parse_metrics(response.read().decode())

    # Idle ticks (records the worker sends itself to close quiet windows)
    # make the lag 1 for a moment now and then: wait for a scrape at 0.
    wait_for(
        lambda: scrape()["aggregator_consumer_lag_records"] == 0,
        timeout_s=PROCESS_TIMEOUT_S,
        what="consumer lag 0 in the metrics",
    )
    samples = scrape()
    ready = get_json(f"{worker.url}/aggregator/health/ready/")
    live = get_json(f"{worker.url}/aggregator/health/live/")
    counts = worker.counts()

    assert samples["aggregator_received_total"] == 2 * len(payloads)
    assert samples["aggregator_duplicates_removed_total"] == (
        counts["repeats"] + counts["redeliveries"]
    )
    assert samples["aggregator_redeliveries_total"] == len(payloads)
    assert samples["aggregator_late_total"] == counts["late"]
    assert samples["aggregator_consumer_lag_records"] <= 1
    assert samples["aggregator_store_backlog_rows"] == 0
    stored = sum(worker.summary()["stored"].values())
    assert samples["aggregator_store_rows_written_total"] == stored
    for stage in ("ingest", "ingest_to_publish", "store_write"):
        count = samples[f'aggregator_stage_latency_seconds_count{{stage="{stage}"}}']
        inf = samples[
            f'aggregator_stage_latency_seconds_bucket{{stage="{stage}",le="+Inf"}}'
        ]
        assert count == inf > 0
    assert samples['aggregator_stage_latency_seconds_count{stage="ingest"}'] == (
        2 * len(payloads)
    )
    assert ready == (200, {"status": "ok", "problems": []})
    assert live == (200, {"status": "live"})


def test_retention_job_of_a_worker_drops_expired_days(
    worker_factory: Callable[..., Any],
) -> None:
    worker = worker_factory(AGGREGATOR_RETENTION_INTERVAL_S="1")

    def tables_exist() -> bool:
        try:
            return bool(worker.query("EXISTS TABLE aggregated_events") == [(1,)])
        except Exception:  # the database itself may not exist yet
            return False

    wait_for(tables_exist, timeout_s=30, what="tables created")
    now_s = int(time.time())

    def insert(prefix: str, *, event_age_days: int, stored_age_days: int) -> None:
        event_ms = (now_s - event_age_days * 86_400) * 1000
        worker.query(
            "INSERT INTO detector_events "
            "(event_id, camera_id, event_time_ms, version, inserted_at) "
            f"SELECT concat('{prefix}-', toString(number)), 'cam', "
            f"toUInt64({event_ms} + number), toUInt64(1), "
            f"toDateTime({now_s - stored_age_days * 86_400}) "
            "FROM system.numbers LIMIT 10"
        )

    insert("expired", event_age_days=40, stored_age_days=35)
    insert("replayed", event_age_days=50, stored_age_days=0)

    wait_for(
        lambda: worker.query("SELECT count() FROM detector_events") == [(10,)],
        timeout_s=30,
        what="expired day dropped",
    )
    left = worker.query(
        "SELECT DISTINCT substring(event_id, 1, 8) FROM detector_events"
    )
    assert left == [("replayed",)]
