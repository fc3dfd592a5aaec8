"""Records keep flowing while a second worker joins and leaves the group.

Every membership change is a rebalance of the worker that stays: its
partitions are revoked and assigned again while fetched batches are on their
way to the agents. A batch fetched under the old assignment and handed over
after the revocation used to be acknowledged unprocessed, and the commit then
stepped over its records: the seek after the rebalance never read them again.
This test sends the garage recording while a second worker joins and leaves
several times, then asks the store for the event id of every record sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from aggregator_app.exceptions import RejectedEvent
from aggregator_app.ingest import RawRecord, parse_record
from aggregator_app.timeparse import to_epoch_ms

from .test_pipeline import (
    DEEPSTREAM,
    GARAGE_FILE,
    RULES,
    SendDetections,
    wait_caught_up,
    wait_stored,
)

pytestmark = pytest.mark.integration

#: Records per send, and the pause between sends: about 100 records a second.
CHUNK_RECORDS = 25
CHUNK_PAUSE_S = 0.15

#: Times the second worker joins and leaves (two rebalances each).
MEMBERSHIP_CYCLES = 4

#: How long the second worker stays in, and out of, the group.
MEMBER_FOR_S = 2.0
AWAY_FOR_S = 1.0


def _payloads() -> list[bytes]:
    lines = GARAGE_FILE.read_bytes().splitlines()
    return [line for line in lines if line.strip()]


def expected_event_ids(payloads: Sequence[bytes]) -> set[str]:
    """Return the event id of every detector event the payloads carry."""
    event_ids: set[str] = set()
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
        try:
            events = parse_record(record, source=DEEPSTREAM, rules=RULES, now_ms=0)
        except RejectedEvent:
            continue
        event_ids.update(event.event_id for event in events)
    return event_ids


def _send_steadily(
    send_detections: SendDetections,
    topic: str,
    payloads: Sequence[bytes],
    failures: list[BaseException],
) -> None:
    """Send ``payloads`` in small chunks, so that records arrive all along."""
    try:
        for start in range(0, len(payloads), CHUNK_RECORDS):
            send_detections(topic, payloads[start : start + CHUNK_RECORDS])
            time.sleep(CHUNK_PAUSE_S)
    except BaseException as error:  # the main thread reports it
        failures.append(error)


def _come_and_go(second: Any, sender: threading.Thread) -> int:
    """Restart and stop the second worker while the sender runs.

    Returns how many times it joined.
    """
    joins = 0
    while sender.is_alive() and joins < MEMBERSHIP_CYCLES:
        time.sleep(AWAY_FOR_S)
        second.restart()
        joins += 1
        time.sleep(MEMBER_FOR_S)
        assert second.stop() == 0
    return joins


def test_rebalances_while_records_flow_lose_no_record(
    worker_factory: Callable[..., Any],
    send_detections: SendDetections,
    record_property: Callable[[str, object], None],
) -> None:
    payloads = _payloads()
    expected = expected_event_ids(payloads)
    group = {"BROKER_SESSION_TIMEOUT": "10", "BROKER_HEARTBEAT_INTERVAL": "1"}
    first = worker_factory(**group)
    second = worker_factory(
        AGGREGATOR_APP_ID=first.app_id,
        AGGREGATOR_TOPIC_PREFIX=first.prefix,
        CLICKHOUSE_URL=first.env["CLICKHOUSE_URL"],
        **group,
    )
    assert second.stop() == 0
    topic = first.topic("detections.deepstream")

    failures: list[BaseException] = []
    sender = threading.Thread(
        target=_send_steadily,
        args=(send_detections, topic, payloads, failures),
        daemon=True,
    )
    sender.start()
    joins = _come_and_go(second, sender)
    sender.join()
    assert failures == []

    wait_caught_up(first)
    wait_stored(first)
    stored = {row[0] for row in first.query("SELECT event_id FROM detector_events")}
    missing = expected - stored
    record_property("joins", joins)
    record_property("expected_event_ids", len(expected))
    record_property("missing_event_ids", len(missing))
    print(
        f"joins={joins} expected={len(expected)} stored={len(stored)} "
        f"missing={len(missing)}"
    )
    assert joins >= 2
    assert sorted(missing) == []
    assert stored <= expected
