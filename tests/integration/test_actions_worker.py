"""Actions through a real worker, the real broker and ClickHouse 18.16 (and chdb).

A face and a wave in either order give one action on the aggregated topic and
one row in the store; a redelivered face adds nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from aggregator_app.ingest import REPLAY_HEADER
from aggregator_app.schema import ActionEvent, DetectorEvent
from aggregator_app.store import EmbeddedStore, NativeStore, action_event_row
from aggregator_app.store.base import ClickHouseStore
from rules.config import load_rules

pytestmark = pytest.mark.integration

#: The fixtures of conftest.py, as these tests call them.
ReadTopic = Callable[..., list[Any]]
WorkerFactory = Callable[..., Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules(REPO_ROOT / "config/aggregation-rules.yml")
UNIFIED = next(source for source in RULES.sources if source.adapter == "unified")
ACTION_TIMEOUT_S = 40.0

PERSON_BOX = {"x_min": 0.40, "y_min": 0.20, "x_max": 0.50, "y_max": 0.60}
FACE_BOX = {"x_min": 0.43, "y_min": 0.20, "x_max": 0.47, "y_max": 0.28}


def detector_event(
    event_id: str, camera_id: str, time_ms: int, *, kind: str
) -> DetectorEvent:
    fields: dict[str, object] = {
        "event_id": event_id,
        "source": "test",
        "camera_id": camera_id,
        "event_time_ms": time_ms,
    }
    if kind == "face":
        fields |= {
            "detector": "face",
            "label": "face",
            "bbox": FACE_BOX,
            "attributes": {"identity": "alice"},
        }
    elif kind == "wave":
        fields |= {"detector": "gesture", "label": "wave", "bbox": PERSON_BOX}
    else:
        fields |= {"detector": "vehicle", "label": "car"}
    return DetectorEvent.model_validate(fields)


def send_events(bootstrap: str, topic: str, events: Sequence[DetectorEvent]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for event in events:
                await producer.send_and_wait(
                    topic,
                    value=event.json_text.encode(),
                    key=event.camera_id.encode(),
                    timestamp_ms=event.event_time_ms,
                    headers=[(REPLAY_HEADER, b"1")],
                )
        finally:
            await producer.stop()

    asyncio.run(send())


def read_actions(
    read_topic: ReadTopic, topic: str, *, count: int, timeout_s: float
) -> list[ActionEvent]:
    deadline = time.monotonic() + timeout_s
    actions: list[ActionEvent] = []
    while time.monotonic() < deadline:
        records = read_topic(topic, count=1, timeout_s=5.0)
        values = [orjson.loads(record.value) for record in records]
        actions = [
            ActionEvent.model_validate(v) for v in values if v["type"] == "action"
        ]
        if len(actions) >= count:
            break
        time.sleep(1.0)
    return actions


def test_face_and_wave_in_either_order_give_one_action(
    worker_factory: WorkerFactory, read_topic: ReadTopic, kafka_bootstrap: str
) -> None:
    worker = worker_factory()
    now_ms = int(time.time() * 1000) - 30_000
    face_first, wave_first = "TUD-act-face-first", "TUD-act-wave-first"
    face = detector_event("face-1", face_first, now_ms, kind="face")
    events = [
        face,
        detector_event("wave-1", face_first, now_ms + 1500, kind="wave"),
        face,  # a producer's retry
        detector_event("wave-2", wave_first, now_ms, kind="wave"),
        detector_event("face-2", wave_first, now_ms + 1200, kind="face"),
        # Later events of the same cameras move the watermark past the decision.
        detector_event("car-1", face_first, now_ms + 12_000, kind="car"),
        detector_event("car-2", wave_first, now_ms + 12_000, kind="car"),
    ]

    send_events(kafka_bootstrap, worker.topic(UNIFIED.topic), events)
    actions = read_actions(
        read_topic,
        worker.topic(RULES.aggregated_topic),
        count=2,
        timeout_s=ACTION_TIMEOUT_S,
    )

    assert sorted(a.aggregated_id for a in actions) == [
        "greeting:face-1+wave-1",
        "greeting:face-2+wave-2",
    ]
    assert {a.action for a in actions} == {"greeting"}
    worker.wait_until(
        lambda summary: summary.get("stored", {}).get("aggregated_events", 0) >= 6,
        timeout_s=ACTION_TIMEOUT_S,
        what="rows stored",
        summary=True,
    )
    stored = worker.query(
        "SELECT aggregated_id, status, label, absorbed_count FROM aggregated_events "
        "WHERE type = 'action' ORDER BY aggregated_id"
    )
    assert stored == [
        ("greeting:face-1+wave-1", "closed", "greeting", 2),
        ("greeting:face-2+wave-2", "closed", "greeting", 2),
    ]
    assert worker.counts()["actions_published"] == 2


def committed_offsets(bootstrap: str, group_id: str, topic: str) -> int:
    """Return how many records of ``topic`` the group has committed, in all."""

    async def read() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(group_id)
        finally:
            await admin.close()
        return sum(
            meta.offset
            for tp, meta in committed.items()
            if tp.topic == topic and meta.offset > 0
        )

    return asyncio.run(read())


def test_held_face_and_wave_survive_a_kill_with_an_empty_data_dir(
    worker_factory: WorkerFactory,
    read_topic: ReadTopic,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    # The killed member leaves the group after 10 s instead of faust's 60.
    worker = worker_factory(BROKER_SESSION_TIMEOUT="10", BROKER_HEARTBEAT_INTERVAL="1")
    topic = worker.topic(UNIFIED.topic)
    now_ms = int(time.time() * 1000) - 30_000
    camera = "TUD-act-restart"
    send_events(
        kafka_bootstrap,
        topic,
        [
            detector_event("face-r", camera, now_ms, kind="face"),
            detector_event("wave-r", camera, now_ms + 800, kind="wave"),
        ],
    )
    deadline = time.monotonic() + ACTION_TIMEOUT_S
    while committed_offsets(kafka_bootstrap, worker.app_id, topic) < 2:
        assert time.monotonic() < deadline, "the two events were never committed"
        time.sleep(0.5)

    # Both are committed and held, undecided: the state is only in the table.
    worker.kill()
    worker.restart(AGGREGATOR_DATA_DIR=str(tmp_path / "empty-data-dir"))
    send_events(
        kafka_bootstrap,
        topic,
        [detector_event("car-r", camera, now_ms + 12_000, kind="car")],
    )
    actions = read_actions(
        read_topic,
        worker.topic(RULES.aggregated_topic),
        count=1,
        timeout_s=ACTION_TIMEOUT_S,
    )

    assert [a.aggregated_id for a in actions] == ["greeting:face-r+wave-r"]


# The store, on both backends.


@pytest.fixture(params=["native", "embedded"])
def action_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ClickHouseStore]:
    database = f"test_{uuid.uuid4().hex}"
    store: ClickHouseStore
    if request.param == "native":
        host, port = request.getfixturevalue("clickhouse_server")
        store = NativeStore(host=host, port=port, database=database, ttl_days=None)
    else:
        store = EmbeddedStore(tmp_path / "chdb", database=database, ttl_days=30)
    store.ensure_schema()
    yield store
    store._execute(f"DROP DATABASE IF EXISTS `{database}`")
    store.close()


def test_an_action_is_stored_once_and_read_back(action_store: ClickHouseStore) -> None:
    now_ms = int(time.time() * 1000)
    members = [
        detector_event("f", "cam-s", now_ms, kind="face"),
        detector_event("w", "cam-s", now_ms + 500, kind="wave"),
    ]
    action = ActionEvent(
        aggregated_id="greeting:f+w",
        rule_id="greeting",
        kind="pair",
        action="greeting",
        camera_id="cam-s",
        start_time_ms=now_ms,
        end_time_ms=now_ms + 500,
        overlap=1.0,
        members=members,
    )
    row = action_event_row(action, inserted_at_ms=now_ms)

    inserted = action_store.insert_aggregated_events([row])
    inserted += action_store.insert_aggregated_events([row])  # published again

    assert inserted == 1
    (stored,) = action_store.fetch_aggregated(now_ms - 1, now_ms + 1)
    assert (stored.type, stored.label) == ("action", "greeting")
    assert ActionEvent.model_validate_json(stored.payload) == action
