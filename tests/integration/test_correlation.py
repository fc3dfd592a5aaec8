"""Correlation through a real worker, the real broker and ClickHouse.

One worker serves every test of this module (starting one costs seconds);
each test uses cameras and event times of its own. The worker runs with a
copy of the rules whose event-time settings suit a test: a grace period that
covers the skew between ingest partitions of a replay sent at once, quiet
cameras after 2 s, tracks closed 2 s after their last event.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from aggregator_app.ingest import REPLAY_HEADER

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0
GRACE_S = 5.0


@pytest.fixture(scope="module")
def rules_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rules = yaml.safe_load((REPO_ROOT / "config/aggregation-rules.yml").read_text())
    rules["correlation"].update(grace_s=GRACE_S, idle_camera_after_s=2, close_after_s=2)
    rules["episodes"].update(gap_s=2, grace_s=1)
    path = tmp_path_factory.mktemp("rules") / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


@pytest.fixture
def worker(worker_factory: Callable[..., Any], rules_path: Path) -> Any:
    return worker_factory(AGGREGATOR_RULES=str(rules_path))


def unified(
    camera: str, time_ms: int, x_m: float, *, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "event_id": event_id or uuid.uuid4().hex,
        "detector": "vehicle",
        "source": "unified",
        "camera_id": camera,
        "event_time_ms": time_ms,
        "label": "car",
        "position": {"x_m": x_m, "y_m": 0.0},
    }


class Topics:
    """Send unified events; read what the worker published, from now on."""

    def __init__(self, bootstrap: str, worker: Any) -> None:
        self.bootstrap = bootstrap
        self.source = worker.topic("detections.unified")
        self.assignments = worker.internal_topic("assignments")
        self.late = worker.topic("late-events")
        self.aggregated = worker.topic("aggregated-events")

    def send(self, events: Sequence[dict[str, Any]], *, pace_s: float = 0.0) -> None:
        asyncio.run(self._send(events, pace_s))

    async def _send(self, events: Sequence[dict[str, Any]], pace_s: float) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await producer.start()
        try:
            for event in events:
                await producer.send_and_wait(
                    self.source,
                    value=json.dumps(event).encode(),
                    key=event["camera_id"].encode(),
                    timestamp_ms=event["event_time_ms"],
                    headers=[(REPLAY_HEADER, b"1")],
                )
                if pace_s:
                    await asyncio.sleep(pace_s)
        finally:
            await producer.stop()

    def send_at_once(self, events: Sequence[dict[str, Any]]) -> None:
        asyncio.run(self._send_at_once(events))

    async def _send_at_once(self, events: Sequence[dict[str, Any]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=20)
        await producer.start()
        try:
            for event in events:
                await producer.send(
                    self.source,
                    value=json.dumps(event).encode(),
                    key=event["camera_id"].encode(),
                    timestamp_ms=event["event_time_ms"],
                    headers=[(REPLAY_HEADER, b"1")],
                )
            await producer.flush()
        finally:
            await producer.stop()

    def read(
        self,
        topic: str,
        until: Callable[[list[Any]], bool],
        *,
        timeout_s: float = TIMEOUT_S,
    ) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
        return asyncio.run(self._read(topic, until, timeout_s))

    async def _read(
        self, topic: str, until: Callable[[list[Any]], bool], timeout_s: float
    ) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=500,
        )
        await consumer.start()
        records: list[tuple[bytes, bytes, dict[str, bytes]]] = []
        try:
            consumer.subscribe([topic])
            deadline_s = time.monotonic() + timeout_s
            while time.monotonic() < deadline_s and not until(records):
                for batch in (await consumer.getmany(timeout_ms=300)).values():
                    records.extend((r.key, r.value, dict(r.headers)) for r in batch)
        finally:
            await consumer.stop()
        return records


@pytest.fixture
def topics(kafka_bootstrap: str, worker: Any) -> Iterator[Topics]:
    yield Topics(kafka_bootstrap, worker)


def global_ids(
    topics: Topics, event_ids: set[str], *, timeout_s: float = TIMEOUT_S
) -> dict[str, str]:
    def done(records: list[Any]) -> bool:
        return event_ids <= {key.decode() for key, _v, _h in records}

    records = topics.read(topics.assignments, done, timeout_s=timeout_s)
    found = {key.decode(): json.loads(value)["global_id"] for key, value, _ in records}
    return {event_id: found[event_id] for event_id in event_ids if event_id in found}


def scene(cameras: tuple[str, str], start_ms: int) -> list[dict[str, Any]]:
    """One car seen by two cameras at once, 2 m apart, then a second car 40 m away."""
    first, second = cameras
    events = []
    for step in range(6):
        time_ms = start_ms + step * 500
        events.append(unified(first, time_ms, step * 1.0))
        events.append(unified(second, time_ms + 3, step * 1.0 + 2.0))
        events.append(unified(first, time_ms + 1, 40.0 + step))
    return events


def table_state(worker: Any, table: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    request = urllib.request.Request(
        f"{worker.url}/aggregator/tables/{table}/?{query}", headers=worker.auth_headers
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def grouping(events: Sequence[dict[str, Any]], ids: dict[str, str]) -> list[int]:
    """Return, per event index, the index of the first event of its group."""
    first_of: dict[str, int] = {}
    return [first_of.setdefault(ids[e["event_id"]], i) for i, e in enumerate(events)]


def test_two_cameras_one_object_one_global_id_closed_when_silent_and_stored(
    topics: Topics, worker: Any
) -> None:
    """Both cars' tracks close once their cameras fall silent (no later event)."""
    start_ms = int(time.time() * 1000)
    events = scene(("10_110_1_1_A0", "10_110_1_2_A0"), start_ms)
    topics.send(events)

    ids = global_ids(topics, {e["event_id"] for e in events})
    assert len(ids) == len(events)
    assert grouping(events, ids) == [0, 0, 2] * 6

    # The table state of the site and of the car's episode, over the web port.
    car_id = ids[events[0]["event_id"]]
    site = table_state(worker, "correlation", site_id="endeavor", global_id=car_id)
    assert site["result"]["known"] is True
    assert site["result"]["tracks"][car_id]["member_count"] == 12
    held = table_state(worker, "episodes", global_id=car_id)
    assert held["result"]["global_id"] == car_id
    assert table_state(worker, "correlation", site_id="nowhere")["result"] == {
        "site_id": "nowhere",
        "known": False,
    }

    def closed(records: list[Any]) -> bool:
        return (
            sum(b'"type":"correlated","status":"closed"' in v for _k, v, _h in records)
            >= 2
        )

    published = topics.read(topics.aggregated, closed)
    correlated = [json.loads(v) for _k, v, _h in published if b'"correlated"' in v]
    car = next(
        c for c in correlated if c["status"] == "closed" and c["member_count"] == 12
    )
    assert sorted(car["cameras"]) == ["10_110_1_1_A0", "10_110_1_2_A0"]

    rows = worker.query(
        "SELECT count() FROM aggregated_events WHERE type = 'correlated'"
    )
    deadline_s = time.monotonic() + TIMEOUT_S
    while rows[0][0] < 4 and time.monotonic() < deadline_s:
        time.sleep(0.5)
        rows = worker.query(
            "SELECT count() FROM aggregated_events WHERE type = 'correlated'"
        )
    assert rows[0][0] >= 4  # two global ids, open and closed


def test_an_object_seen_by_two_cameras_makes_one_episode(topics: Topics) -> None:
    """Once the cameras fall silent, each object's observations are fused
    into one final episode: both cameras, start to end, published once."""
    start_ms = int(time.time() * 1000)
    events = scene(("10_110_6_1_A0", "10_110_6_2_A0"), start_ms)
    topics.send(events)
    ids = global_ids(topics, {e["event_id"] for e in events})
    car = ids[events[0]["event_id"]]

    def episode_of_car(records: list[Any]) -> bool:
        return any(car.encode() in v and b'"episode"' in v for _k, v, _h in records)

    published = topics.read(topics.aggregated, episode_of_car)
    episodes = [
        json.loads(v)
        for _k, v, _h in published
        if b'"type":"episode"' in v and json.loads(v)["global_id"] == car
    ]
    assert len(episodes) == 1
    episode = episodes[0]
    assert set(episode["cameras"]) == {"10_110_6_1_A0", "10_110_6_2_A0"}
    assert episode["observation_count"] == 12
    assert episode["start_time_ms"] == start_ms
    assert episode["end_time_ms"] == start_ms + 5 * 500 + 3


def test_late_event_once_and_replay_at_once_groups_as_paced(topics: Topics) -> None:
    """A late event is published once on late-events, even delivered twice;
    a scene sent at once is grouped as the same scene sent at its own pace."""
    _late_event_lands_in_late_events_once(topics)
    _replay_at_once_and_paced_group_alike(topics)


def _late_event_lands_in_late_events_once(topics: Topics) -> None:
    start_ms = int(time.time() * 1000) - 120_000
    camera = "10_110_2_1_A0"
    on_time = [unified(camera, start_ms + step * 1000, 0.0) for step in range(12)]
    late = unified(camera, start_ms, 0.0)
    topics.send(on_time)
    global_ids(topics, {on_time[0]["event_id"]})  # decided: time has passed it
    topics.send([late, late])  # delivered twice

    def arrived(records: list[Any]) -> bool:
        return any(key.decode() == late["event_id"] for key, _v, _h in records)

    records = topics.read(topics.late, arrived)
    mine = [h for key, _v, h in records if key.decode() == late["event_id"]]
    assert len(mine) == 1
    assert int(mine[0]["late-by-ms"]) > 0


def _replay_at_once_and_paced_group_alike(topics: Topics) -> None:
    start_ms = int(time.time() * 1000)
    fast = scene(("10_110_4_1_A0", "10_110_4_2_A0"), start_ms)
    paced = scene(("10_110_5_1_A0", "10_110_5_2_A0"), start_ms + 60_000)
    topics.send(fast)
    topics.send(paced, pace_s=0.5 / 3)

    fast_ids = global_ids(topics, {e["event_id"] for e in fast})
    paced_ids = global_ids(topics, {e["event_id"] for e in paced})
    assert grouping(fast, fast_ids) == grouping(paced, paced_ids)


def test_state_survives_a_restart_from_the_changelog(
    topics: Topics, worker: Any, tmp_path: Path
) -> None:
    """After a restart with an empty data dir, the correlation table is read
    back from its changelog: a redelivered event gets its global id again."""
    start_ms = int(time.time() * 1000)
    events = scene(("10_110_6_1_A0", "10_110_6_2_A0"), start_ms)
    topics.send(events)
    before = global_ids(topics, {e["event_id"] for e in events})
    assert len(before) == len(events)

    worker.stop()
    worker.restart(AGGREGATOR_DATA_DIR=str(tmp_path / "fresh-data"))
    again = events[-3]
    topics.send([again])

    def republished(records: list[Any]) -> bool:
        return sum(key.decode() == again["event_id"] for key, _v, _h in records) >= 2

    records = topics.read(topics.assignments, republished)
    ids = {
        json.loads(v)["global_id"]
        for k, v, _h in records
        if k.decode() == again["event_id"]
    }
    assert ids == {before[again["event_id"]]}


def test_a_site_with_thousands_of_objects_keeps_its_state_in_small_records(
    topics: Topics, worker: Any
) -> None:
    """3,000 objects of one site at once: their tracks, once one table value,
    passed Kafka's 1 MiB record limit and stopped the worker."""
    start_ms = int(time.time() * 1000)
    cameras = [f"10_110_7_{index}_A0" for index in range(1, 5)]
    events = [
        unified(cameras[index % 4], start_ms + index, 100.0 * index)
        for index in range(3000)
    ]
    topics.send_at_once(events)

    last = events[-1]["event_id"]
    ids = global_ids(topics, {last}, timeout_s=90.0)
    assert last in ids
    assert worker.counts()["correlated_open"] >= 3000
