"""The outbox against the real broker: order, offsets, partitioning, failures."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

from aggregator_app.outbox import InFlight, Outbox, SendFailed, SentRecord

PARTITIONS = 3


class _FaustProducer:
    """What the outbox asks of faust's producer: its aiokafka producer."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    def _ensure_producer(self) -> AIOKafkaProducer:
        return self._producer


@pytest.fixture
async def topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    name = f"t-outbox-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[_FaustProducer]:
    client = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, max_batch_size=16 * 1024, linger_ms=5
    )
    await client.start()
    try:
        yield _FaustProducer(client)
    finally:
        await client.stop()


async def _read(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    records: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=1000)
                records += [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    return records


async def test_records_keep_their_order_per_partition_across_outboxes(
    kafka_bootstrap: str, topic: str, producer: _FaustProducer
) -> None:
    failures: list[BaseException] = []

    async def on_failure(exc: BaseException) -> None:
        failures.append(exc)

    in_flight = InFlight(limit=8, on_failure=on_failure)
    acked: list[int] = []
    for batch in range(20):
        outbox = Outbox(producer)
        for index in range(200):
            # Many small builders per partition: each outbox spans several.
            await outbox.send(
                topic,
                key=b"k",
                value=f"{batch}:{index}".encode() + b"x" * 300,
                partition=index % PARTITIONS,
            )
        await in_flight.hand_over(outbox, functools.partial(acked.append, batch))

    records = await _read(kafka_bootstrap, topic, 20 * 200)
    for partition in range(PARTITIONS):
        values = [
            tuple(int(n) for n in r.value.split(b"x", 1)[0].decode().split(":"))
            for r in sorted(records, key=lambda r: r.offset)
            if r.partition == partition
        ]
        assert values == sorted(values)
    assert failures == []
    assert sorted(acked) == list(range(20))
    assert in_flight.records == 0


async def test_on_sent_gets_the_offset_and_keys_go_where_kafka_puts_them(
    kafka_bootstrap: str, topic: str, producer: _FaustProducer
) -> None:
    outbox = Outbox(producer)
    sent: dict[bytes, SentRecord] = {}
    keys = [f"camera-{n}".encode() for n in range(30)]
    for key in keys:
        await outbox.send(
            topic,
            key=key,
            value=key,
            timestamp_ms=1_536_773_000_000,
            on_sent=functools.partial(sent.__setitem__, key),
        )
    assert await outbox.flush() == len(keys)

    records = {r.key: r for r in await _read(kafka_bootstrap, topic, len(keys))}
    for key in keys:
        record = records[key]
        assert (record.partition, record.offset) == (
            sent[key].partition,
            sent[key].offset,
        )
        assert record.partition == (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
        assert record.timestamp == 1_536_773_000_000


async def test_a_record_the_broker_refuses_fails_the_flush(
    topic: str, producer: _FaustProducer
) -> None:
    outbox = Outbox(producer)
    await outbox.send(topic, key=None, value=b"x" * (2 * 1024 * 1024), partition=0)
    with pytest.raises(SendFailed):
        await outbox.flush()
