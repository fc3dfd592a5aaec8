"""The whole pipeline, one worker process against the real broker and ClickHouse.

Every test replays real DeepStream data (the 360-degree garage recording) into
a worker of its own and compares what comes out with an oracle computed
offline by the pure code: :func:`~aggregator_app.ingest.parse_record` on every
message, then one :class:`~aggregator_app.dedup.Deduplicator` over the events
in send order. Its kept events are the ``open`` observations the service must
publish, and its spans what the ``closed`` ones must say.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord
from aiokafka.partitioner import murmur2
from aiokafka.structs import RecordMetadata

from aggregator_app.dedup import Deduplicator, MemorySpanStore
from aggregator_app.ingest import (
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    RawRecord,
    parse_record,
)
from aggregator_app.timeparse import to_epoch_ms
from rules.config import load_rules

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GARAGE_FILE = REPO_ROOT / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl"
#: The first lines of the recording: 46 cameras, about 7 minutes of event
#: time. No event in it is later than the grace period, so spans absorb
#: nothing after they close and the oracle's final spans are the closed ones.
GARAGE_LINES = 800

RULES = load_rules(REPO_ROOT / "config/aggregation-rules.yml")
DEEPSTREAM = next(source for source in RULES.sources if source.adapter == "deepstream")
RULE_ID = RULES.dedup.rule_id

PROCESS_TIMEOUT_S = 60.0
# Spans of a quiet partition close after close_after_idle_s, on the next 1 s tick.
CLOSE_TIMEOUT_S = RULES.dedup.close_after_idle_s + 30.0
STORE_TIMEOUT_S = 30.0

SendDetections = Callable[..., list[RecordMetadata]]
ReadTopic = Callable[..., list[ConsumerRecord]]


# The oracle.


@dataclass(frozen=True)
class ExpectedSpan:
    """What the ``closed`` observation of one kept event must say."""

    start_time_ms: int
    end_time_ms: int
    absorbed_count: int
    absorbed_ids: tuple[str, ...]


@dataclass(frozen=True)
class Expectation:
    """What the service must make of a sequence of messages."""

    accepted_events: int
    repeats: int
    redeliveries: int
    spans: dict[str, ExpectedSpan]

    @property
    def open_ids(self) -> list[str]:
        """Return the aggregated ids of the ``open`` observations, sorted."""
        return sorted(self.spans)


def _partition_of(camera_id: str) -> int:
    """Return the partition Kafka's default partitioner gives a camera's records."""
    return (murmur2(camera_id.encode()) & 0x7FFFFFFF) % RULES.partitions


def expected_observations(payloads: Sequence[bytes]) -> Expectation:
    """Return what the service must publish for ``payloads`` sent in this order."""
    deduplicator = Deduplicator(RULES.dedup, MemorySpanStore())
    kept = {}
    outcomes: Counter[str] = Counter()
    accepted = 0
    for offset, payload in enumerate(payloads):
        message = orjson.loads(payload)
        time_ms = to_epoch_ms(message["@timestamp"], naive="utc")
        record = RawRecord(
            value=payload,
            key=message["sensor"]["id"].encode(),
            topic=DEEPSTREAM.topic,
            partition=0,
            offset=offset,
            timestamp_ms=time_ms,
            replayed=True,
        )
        for event in parse_record(record, source=DEEPSTREAM, rules=RULES, now_ms=0):
            accepted += 1
            decision = deduplicator.observe(event, _partition_of(event.camera_id))
            outcomes[decision.outcome] += 1
            if decision.outcome == "kept":
                kept[f"{RULE_ID}:{event.event_id}"] = decision.span

    spans = {
        aggregated_id: ExpectedSpan(
            start_time_ms=span.start_ms,
            end_time_ms=span.last_ms,
            absorbed_count=span.absorbed_count,
            absorbed_ids=tuple(span.absorbed_ids),
        )
        for aggregated_id, span in kept.items()
    }
    return Expectation(
        accepted_events=accepted,
        repeats=outcomes["repeat"],
        redeliveries=outcomes["redelivery"],
        spans=spans,
    )


# Fixtures and helpers.


@pytest.fixture(scope="module")
def garage_payloads() -> list[bytes]:
    """Return the first ``GARAGE_LINES`` messages of the garage recording."""
    lines = GARAGE_FILE.read_bytes().splitlines()
    return [line for line in lines if line.strip()][:GARAGE_LINES]


def observations(
    records: Sequence[ConsumerRecord], status: str
) -> list[dict[str, Any]]:
    """Return the decoded observations of one status, in topic order.

    The topic carries ``correlated`` events too; these tests are about
    observations (correlation has its own, ``test_correlation.py``).
    """
    decoded = [orjson.loads(record.value) for record in records]
    return [
        item
        for item in decoded
        if item["type"] == "observation" and item["status"] == status
    ]


def closed_spans(records: Sequence[ConsumerRecord]) -> dict[str, ExpectedSpan]:
    """Return what the ``closed`` observations say, by aggregated id."""
    return {
        item["aggregated_id"]: ExpectedSpan(
            start_time_ms=item["start_time_ms"],
            end_time_ms=item["end_time_ms"],
            absorbed_count=item["absorbed_count"],
            absorbed_ids=tuple(item["absorbed_ids"]),
        )
        for item in observations(records, "closed")
    }


def dedup_done(counts: dict[str, Any]) -> bool:
    """Return whether the dedup agent has decided every accepted event."""
    decided = (
        counts["kept"]
        + counts["repeats"]
        + counts["redeliveries"]
        + counts["reprocessed"]
    )
    return bool(decided == counts["accepted_events"])


def wait_processed(worker: Any, *, received: int) -> dict[str, Any]:
    """Wait until ``received`` messages are read and their opens published."""
    return worker.wait_until(
        lambda counts: (
            counts["received"] >= received
            and dedup_done(counts)
            and counts["published_open"] >= counts["kept"] + counts["reprocessed"]
            and counts["in_flight_records"] == 0
        ),
        timeout_s=PROCESS_TIMEOUT_S,
        what=f"{received} messages processed",
    )


def wait_stored(worker: Any) -> dict[str, Any]:
    """Wait until the store writer's backlog is empty; return the summary."""
    return worker.wait_until(
        lambda summary: summary["counts"]["store_backlog_rows"] == 0,
        timeout_s=STORE_TIMEOUT_S,
        what="store backlog empty",
        summary=True,
    )


def wait_caught_up(worker: Any) -> None:
    """Wait until the group has committed every record of both consumed topics.

    After a restart the counters of the new process cannot tell: it reads again
    what its predecessor handled and did not commit.
    """
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    lag = worker.lag()
    while lag != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        lag = worker.lag()
    assert lag == 0, f"consumer group still {lag} records behind"


def _iso(time_ms: int) -> str:
    stamp = datetime.fromtimestamp(time_ms / 1000, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _edited(payload: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    message = orjson.loads(payload)
    edit(message)
    return orjson.dumps(message)


# Tests.


@pytest.mark.parametrize("store", ["server", "embedded"])
def test_garage_recording_yields_the_expected_observations(
    store: str,
    worker_factory: Callable[..., Any],
    send_detections: SendDetections,
    read_topic: ReadTopic,
    garage_payloads: list[bytes],
) -> None:
    expected = expected_observations(garage_payloads)
    kept = len(expected.spans)
    worker = worker_factory(store=store)

    send_detections(worker.topic("detections.deepstream"), garage_payloads)
    wait_processed(worker, received=len(garage_payloads))
    counts = worker.wait_until(
        lambda counts: counts["published_closed"] >= counts["published_open"],
        timeout_s=CLOSE_TIMEOUT_S,
        what="every span closed",
    )
    records = read_topic(worker.topic("aggregated-events"), count=2 * kept)

    opens = observations(records, "open")
    closes = observations(records, "closed")
    assert sorted(item["aggregated_id"] for item in opens) == expected.open_ids
    assert sorted(item["aggregated_id"] for item in closes) == expected.open_ids
    assert closed_spans(records) == expected.spans
    assert all(
        record.key == orjson.loads(record.value)["aggregated_id"].encode()
        for record in records
    )

    assert counts["received"] == len(garage_payloads)
    assert counts["received"] == counts["accepted_messages"] + counts["rejected"]
    assert counts["rejected"] == 0
    assert counts["accepted_events"] == expected.accepted_events
    assert counts["kept"] == kept
    assert counts["repeats"] == expected.repeats
    assert counts["redeliveries"] == 0
    assert counts["published_open"] == counts["published_closed"] == kept

    summary = wait_stored(worker)
    assert summary["stored"]["detector_events"] == expected.accepted_events
    # Correlated events are stored beside the observations.
    assert summary["stored"]["aggregated_events"] >= 2 * kept
    if store == "server":
        stored_ids = worker.query(
            "SELECT aggregated_id, status, count() FROM aggregated_events "
            "WHERE type = 'observation' GROUP BY aggregated_id, status"
        )
        assert sorted(stored_ids) == sorted(
            (aggregated_id, status, 1)
            for aggregated_id in expected.open_ids
            for status in ("open", "closed")
        )
        assert worker.query(
            "SELECT outcome, count(), uniqExact(event_id) FROM detector_events "
            "GROUP BY outcome ORDER BY outcome"
        ) == [
            ("kept", kept, kept),
            ("repeat", expected.repeats, expected.repeats),
        ]


def test_invalid_messages_are_dead_lettered_byte_for_byte(
    worker_factory: Callable[..., Any],
    send_detections: SendDetections,
    read_topic: ReadTopic,
    garage_payloads: list[bytes],
) -> None:
    now_ms = int(time.time() * 1000)
    base = garage_payloads[0]
    replayed_invalid = {
        "broken_json": b'{"messageid": "m-1", "sensor": {"id": ',
        "non_finite_number": base.replace(b'"speed": 0', b'"speed": NaN', 1),
        "confidence_out_of_range": _edited(
            base, lambda message: message["object"]["vehicle"].update(confidence=7)
        ),
        "unknown_camera": _edited(
            base, lambda message: message["sensor"].update(id="unknown-camera-9")
        ),
        "too_large": _edited(
            base, lambda message: message.update(videoPath="v" * 300 * 1024)
        ),
    }
    live_skewed = _edited(
        base, lambda message: message.update({"@timestamp": _iso(now_ms - 7_200_000)})
    )
    live_valid = _edited(
        base,
        lambda message: message.update(
            {"@timestamp": _iso(now_ms), "messageid": "live-valid-1"}
        ),
    )
    assert b"NaN" in replayed_invalid["non_finite_number"]
    worker = worker_factory(store="embedded")
    topic = worker.topic("detections.deepstream")

    sent = dict(
        zip(
            replayed_invalid,
            send_detections(topic, list(replayed_invalid.values())),
            strict=True,
        )
    )
    sent["clock_skew"] = send_detections(topic, [live_skewed], replayed=False)[0]
    send_detections(topic, [live_valid], replayed=False)
    payloads = {**replayed_invalid, "clock_skew": live_skewed}
    counts = wait_processed(worker, received=len(payloads) + 1)

    dead = read_topic(worker.topic("dead-letters"), count=len(payloads))
    assert len(dead) == len(payloads)
    by_reason = {
        dict(record.headers)[HEADER_REASON].decode(): record for record in dead
    }
    assert set(by_reason) == set(payloads)
    for reason, payload in payloads.items():
        record, metadata = by_reason[reason], sent[reason]
        headers = dict(record.headers)
        assert record.value == payload, reason
        assert headers[HEADER_TOPIC] == topic.encode(), reason
        assert headers[HEADER_PARTITION] == str(metadata.partition).encode(), reason
        assert headers[HEADER_OFFSET] == str(metadata.offset).encode(), reason
    assert by_reason["unknown_camera"].key == b"unknown-camera-9"
    assert by_reason["broken_json"].key is None

    assert counts["received"] == len(payloads) + 1
    assert counts["rejected"] == len(payloads)
    assert counts["rejected_by_reason"] == dict.fromkeys(payloads, 1)
    assert counts["accepted_messages"] == counts["accepted_events"] == 1
    assert counts["kept"] == counts["published_open"] == 1
    assert worker.running()
    published = read_topic(worker.topic("aggregated-events"), count=1)
    assert [item["aggregated_id"] for item in observations(published, "open")] == [
        f"{RULE_ID}:live-valid-1"
    ]
    assert wait_stored(worker)["stored"]["detector_events"] == 1


def test_injected_redeliveries_are_all_removed(
    worker_factory: Callable[..., Any],
    send_detections: SendDetections,
    read_topic: ReadTopic,
    garage_payloads: list[bytes],
) -> None:
    payloads = garage_payloads[:400]
    expected = expected_observations(payloads)
    worker = worker_factory()

    send_detections(worker.topic("detections.deepstream"), payloads, copies=2)
    counts = wait_processed(worker, received=2 * len(payloads))
    records = read_topic(worker.topic("aggregated-events"), count=len(expected.spans))

    opens = [item["aggregated_id"] for item in observations(records, "open")]
    assert sorted(opens) == expected.open_ids
    assert counts["received"] == counts["accepted_messages"] == 2 * len(payloads)
    assert counts["redeliveries"] == len(payloads)
    assert counts["repeats"] == expected.repeats
    assert counts["kept"] == counts["published_open"] == len(expected.spans)


@pytest.mark.parametrize(
    "variant",
    [
        "sigkill",
        "sigkill-new-data-dir",
        "sigterm",
    ],
)
def test_restart_mid_stream_loses_and_adds_no_observation(
    variant: str,
    tmp_path: Path,
    worker_factory: Callable[..., Any],
    send_detections: SendDetections,
    read_topic: ReadTopic,
    garage_payloads: list[bytes],
    record_property: Callable[[str, object], None],
) -> None:
    expected = expected_observations(garage_payloads)
    half = len(garage_payloads) // 2
    # A killed member leaves the group when its session expires: 10 s, not 60 s.
    worker = worker_factory(BROKER_SESSION_TIMEOUT="10", BROKER_HEARTBEAT_INTERVAL="1")
    topic = worker.topic("detections.deepstream")

    send_detections(topic, garage_payloads[:half])
    wait_processed(worker, received=half)
    # What the next process must read again: at-least-once re-publishes from it.
    uncommitted = worker.lag()
    if variant == "sigterm":
        assert worker.stop() == 0
    else:
        worker.kill()
    if variant == "sigkill-new-data-dir":
        worker.restart(AGGREGATOR_DATA_DIR=str(tmp_path / "data-after-restart"))
    else:
        worker.restart()
    send_detections(topic, garage_payloads[half:])
    wait_caught_up(worker)
    # The topic also carries closed observations and correlated events: read
    # until every expected open observation is there (or the time is up).
    deadline_s = time.monotonic() + 60.0
    while True:
        records = read_topic(
            worker.topic("aggregated-events"), count=len(expected.spans)
        )
        opens = observations(records, "open")
        seen = {item["aggregated_id"] for item in opens}
        if seen >= set(expected.open_ids) or time.monotonic() > deadline_s:
            break
        time.sleep(1.0)

    by_id: dict[str, list[dict[str, Any]]] = {}
    for item in opens:
        by_id.setdefault(item["aggregated_id"], []).append(item)
    repeated = {key: items for key, items in by_id.items() if len(items) > 1}
    record_property("uncommitted_at_stop", uncommitted)
    record_property("open_records", len(opens))
    record_property("open_ids_repeated", len(repeated))
    print(
        f"{variant}: uncommitted at stop={uncommitted} open records={len(opens)} "
        f"distinct={len(by_id)} repeated ids={len(repeated)}"
    )
    assert sorted(by_id) == expected.open_ids
    for aggregated_id, items in repeated.items():
        assert all(item == items[0] for item in items), aggregated_id
    if variant == "sigterm":
        assert repeated == {}

    wait_stored(worker)
    stored = worker.query(
        "SELECT aggregated_id, status, count() FROM aggregated_events "
        "WHERE type = 'observation' GROUP BY aggregated_id, status"
    )
    assert [row for row in stored if row[2] != 1] == []
    assert sorted(row[0] for row in stored if row[1] == "open") == expected.open_ids


def test_spans_open_at_a_graceful_restart_still_close(
    worker_factory: Callable[..., Any],
    send_detections: SendDetections,
    read_topic: ReadTopic,
    garage_payloads: list[bytes],
) -> None:
    payloads = garage_payloads[: len(garage_payloads) // 2]
    expected = expected_observations(payloads)
    worker = worker_factory()

    send_detections(worker.topic("detections.deepstream"), payloads)
    before_stop = wait_processed(worker, received=len(payloads))
    assert worker.stop() == 0
    worker.restart()
    still_open = len(expected.spans) - before_stop["published_closed"]
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.counts()["published_closed"] >= still_open:
            break
        time.sleep(0.5)
    records = read_topic(
        worker.topic("aggregated-events"), count=2 * len(expected.spans)
    )

    closes = observations(records, "closed")
    closed = closed_spans(records)
    never_closed = sorted(set(expected.spans) - set(closed))
    assert never_closed == [], (
        f"{len(never_closed)} spans open at the stop never closed"
    )
    assert closed == expected.spans
    assert len(closes) == len(expected.spans)


def test_health_and_metrics_answer_on_the_web_port(
    worker_factory: Callable[..., Any],
    send_detections: SendDetections,
    garage_payloads: list[bytes],
) -> None:
    worker = worker_factory()
    payloads = garage_payloads[:50]
    send_detections(worker.topic("detections.deepstream"), payloads)
    wait_processed(worker, received=len(payloads))

    with urllib.request.urlopen(f"{worker.url}/aggregator/health/") as response:
        health = json.loads(response.read())
        assert response.status == 200
    with urllib.request.urlopen(f"{worker.url}/aggregator/metrics/") as response:
        metrics = response.read().decode().splitlines()

    assert health == {"status": "ok", "problems": []}
    assert f"aggregator_received_total {len(payloads)}" in metrics
    assert any(line.startswith("aggregator_assigned_partitions ") for line in metrics)
