"""What the health and metrics views ask of the running worker: Kafka, lag, store.

The faust and aiokafka objects they read are reached here, and only here
(some only through private attributes, noted where used), so that a faust
upgrade breaks one module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from faust.types import TP, AppT

__all__ = ["Readiness", "consumer_lag", "kafka_problem", "readiness"]

logger = logging.getLogger(__name__)

_KAFKA_TIMEOUT_S = 2.0
_KAFKA_CHECK_EVERY_S = 5.0
_kafka_checked: dict[str, object] = {"at_s": 0.0, "problem": None}


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a worker can do its work, and what stops it if not."""

    problems: tuple[str, ...]

    @property
    def ready(self) -> bool:
        """Return whether nothing stops the worker."""
        return not self.problems


async def kafka_problem(app: AppT) -> str | None:
    """Return why the broker cannot be reached, or ``None`` when it answers.

    Asks the broker for its metadata through the app's producer, at most every
    ``_KAFKA_CHECK_EVERY_S`` (a scrape or probe does not hit the broker each time).
    """
    now_s = time.monotonic()
    if now_s - float(_kafka_checked["at_s"]) < _KAFKA_CHECK_EVERY_S:  # type: ignore[arg-type]  # a float, set below
        return _kafka_checked["problem"]  # type: ignore[return-value]  # str or None, set below

    problem = await _ask_broker(app)
    _kafka_checked.update(at_s=now_s, problem=problem)
    return problem


async def _ask_broker(app: AppT) -> str | None:
    # faust's aiokafka Producer keeps its AIOKafkaProducer in ``_producer``.
    producer = getattr(app.producer, "_producer", None)
    if producer is None:
        return "kafka: producer not started"
    try:
        await asyncio.wait_for(
            producer.client.fetch_all_metadata(), timeout=_KAFKA_TIMEOUT_S
        )
    except Exception as exc:  # any client error means: not reachable now
        return f"kafka: broker does not answer: {exc!r}"
    return None


async def consumer_lag(app: AppT) -> dict[TP, int]:
    """Return, per partition this worker consumes, the records not committed yet.

    Lag is the partition's end (high watermark) minus the group's committed
    offset (or, before the first commit, the consumer's position). Changelog
    partitions (read only to restore tables) and partitions whose end the
    consumer does not know yet are left out.
    """
    consumer = app.consumer
    # faust keeps the last offsets it committed in ``_committed_offset``.
    committed = getattr(consumer, "_committed_offset", {})
    lag: dict[TP, int] = {}
    for tp in sorted(app.assignor.assigned_actives()):
        if tp.topic.endswith("-changelog"):
            continue
        end = consumer.highwater(tp)
        if end is None:
            continue
        position = committed.get(tp)
        if position is None:
            position = await consumer.position(tp)
        lag[tp] = max(0, int(end) - int(position or 0))
    return lag


async def readiness(app: AppT, *, store_error: str | None, max_lag: int) -> Readiness:
    """Return whether the worker is ready: partitions, Kafka, store, lag.

    Args:
        app: the faust app of the worker.
        store_error: the store writer's last failure, ``None`` if it writes.
        max_lag: most records behind, summed over partitions, still ready.
    """
    problems: list[str] = []
    if not app.assignor.assigned_actives():
        problems.append("no partitions assigned")

    broker = await kafka_problem(app)
    if broker is not None:
        problems.append(broker)

    if store_error is not None:
        problems.append(f"store: {store_error}")

    total_lag = sum((await consumer_lag(app)).values()) if not broker else 0
    if total_lag > max_lag:
        problems.append(f"consumer lag {total_lag} records > {max_lag}")
    return Readiness(problems=tuple(problems))
