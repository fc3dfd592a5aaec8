"""Replay a recorded detector file into a detector topic.

``aggregator-replay FILE`` (or ``python -m aggregator_app.replay FILE``) turns
the messages of one producer's file into Kafka records the way that producer
publishes them, and sends them with aiokafka (idempotent, batched). Every
record carries:

* as key, the camera id;
* as timestamp, the event time in ms, so that downstream windows follow event
  time;
* the header ``x-aggregator-replay: 1``: the ingest agents then check clock
  skew against the record's own timestamp, not the worker's clock.

How each format is read (file; key; event time):

* ``deepstream``: JSON lines, or one JSON object; ``sensor.id``; ``@timestamp``.
* ``frigate``: a JSON array, one record per element, or JSON lines of MQTT
  messages; ``camera``; ``frame_time``, else ``start_time``.
* ``dlstreamer``: JSON lines; ``--camera``; replay start + ``timestamp`` (ns).
* ``mot``: CSV rows; ``--camera``; replay start + (frame - 1) / fps.
* ``unified``: JSON lines; ``camera_id``; ``event_time_ms``.

DL Streamer and MOT files hold times relative to their stream start only; the
stream starts when the replay starts. A message whose key or time cannot be
read is sent as it is, without them: the service must dead-letter it. Only
blank lines are skipped, and counted in a warning.

The default topic is that of the rules-file source (``AGGREGATOR_RULES``) whose
adapter is the format, with ``AGGREGATOR_TOPIC_PREFIX`` before it, as the
worker names it. At the end one line goes to stdout::

    replay: sent=3028 duplicates=301 topic=T elapsed_s=0.6 rate_per_s=5500.0

``sent`` counts the file's records, ``duplicates`` the extra copies;
``rate_per_s`` is all records (both) per second.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from tqdm import tqdm

from aggregator_app.exceptions import AggregatorError, ConfigError, RejectedEvent
from aggregator_app.ingest import REPLAY_HEADER
from aggregator_app.timeparse import to_epoch_ms
from rules.config import load_rules

__all__ = [
    "DEFAULT_FPS",
    "FORMATS",
    "REPLAY_HEADER",
    "PlannedSend",
    "ReplayRecord",
    "ReplayStats",
    "default_camera",
    "guess_format",
    "main",
    "plan_sends",
    "read_fps",
    "read_payloads",
    "read_records",
    "rebase_records",
    "replay",
    "to_record",
]

logger = logging.getLogger(__name__)

FORMATS: Final = ("deepstream", "frigate", "dlstreamer", "mot", "unified")
DEFAULT_FPS: Final = 25.0

_REPO_ROOT: Final = Path(__file__).resolve().parent.parent
_DEFAULT_RULES: Final = _REPO_ROOT / "config" / "aggregation-rules.yml"
_HEADERS: Final = [(REPLAY_HEADER, b"1")]
_MAX_PENDING_SENDS: Final = 10_000
_FRIGATE_TIME_FIELDS: Final = ("start_time", "end_time", "frame_time")


class ReplayRecord(NamedTuple):
    """One Kafka record to send: key, timestamp (epoch ms) and value."""

    key: bytes | None
    timestamp_ms: int | None
    value: bytes


class PlannedSend(NamedTuple):
    """One send of a record, ``at_s`` seconds after the replay starts."""

    record: ReplayRecord
    at_s: float
    duplicate: bool


class ReplayStats(NamedTuple):
    """What a replay sent, and how fast.

    ``sent`` counts the file's records; ``duplicates`` the extra copies, so
    ``sent + duplicates`` records reached the topic in ``elapsed_s``.
    """

    sent: int
    duplicates: int
    elapsed_s: float


# -- reading a file -----------------------------------------------------------


def read_payloads(path: Path, *, fmt: str) -> list[bytes]:
    """Return the messages of a file, one payload per Kafka record.

    A file that is one JSON document gives one payload per element of an array,
    or one payload for an object (both re-serialised compactly). Any other file
    gives one payload per line, byte for byte; blank lines are skipped.
    """
    data = path.read_bytes()
    document = None if fmt == "mot" else _json_document(data)
    if isinstance(document, list):
        return [orjson.dumps(item) for item in document]
    if isinstance(document, dict):
        return [orjson.dumps(document)]

    lines = data.splitlines()
    payloads = [line for line in lines if line.strip()]
    if len(payloads) < len(lines):
        logger.warning(
            "replay: skipped blank lines: file=%s count=%d",
            path,
            len(lines) - len(payloads),
        )
    return payloads


def _json_document(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def guess_format(payloads: Sequence[bytes]) -> str:
    """Return the format of a file's payloads, from the first readable one.

    Raises:
        ConfigError: none of the first payloads looks like a known format.
    """
    for payload in payloads[:20]:
        fmt = _format_of(payload)
        if fmt is not None:
            return fmt
    raise ConfigError("cannot tell the format of the file; pass --format")


def _format_of(payload: bytes) -> str | None:
    decoded = _decode_object(payload)
    if decoded is None:
        return "mot" if _is_csv_row(payload) else None
    if "messageid" in decoded or "sensor" in decoded:
        return "deepstream"
    if "event_id" in decoded and "camera_id" in decoded:
        return "unified"
    if "objects" in decoded:
        return "dlstreamer"
    if "camera" in decoded or "after" in decoded:
        return "frigate"
    return None


def _is_csv_row(payload: bytes) -> bool:
    try:
        [float(cell) for cell in payload.decode("ascii").split(",")]
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _decode_object(payload: bytes) -> dict[str, Any] | None:
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None


def default_camera(path: Path, fmt: str) -> str | None:
    """Return the camera id of a MOT or DL Streamer file without ``--camera``.

    MOT: the sequence folder (``TUD-Stadtmitte/det/det.txt`` and
    ``TUD-Stadtmitte/det.txt`` both give ``TUD-Stadtmitte``). DL Streamer:
    ``dlstreamer-<file stem>``. Other formats name their camera in the payload.
    """
    if fmt == "mot":
        folder = path.resolve().parent
        return folder.parent.name if folder.name in ("det", "gt") else folder.name
    if fmt == "dlstreamer":
        return f"dlstreamer-{path.stem}"
    return None


def read_fps(path: Path) -> float:
    """Return the frame rate of the MOT sequence of a file, from its seqinfo.ini.

    The file is looked for beside the rows, then one folder up; without it, or
    without ``frameRate``, the rate is :data:`DEFAULT_FPS`.
    """
    folder = path.resolve().parent
    for candidate in (folder / "seqinfo.ini", folder.parent / "seqinfo.ini"):
        if candidate.is_file():
            parser = configparser.ConfigParser()
            parser.read(candidate, encoding="utf-8")
            return parser.getfloat("Sequence", "frameRate", fallback=DEFAULT_FPS)
    return DEFAULT_FPS


def read_records(
    path: Path,
    *,
    fmt: str,
    camera: str | None = None,
    fps: float = DEFAULT_FPS,
    stream_start_ms: int = 0,
) -> list[ReplayRecord]:
    """Return the records of a file, in file order.

    Args:
        path: the file.
        fmt: one of :data:`FORMATS`.
        camera: the key of MOT and DL Streamer records; their default camera
            (:func:`default_camera`) when ``None``.
        fps: the frame rate of a MOT sequence.
        stream_start_ms: when a MOT or DL Streamer stream starts (epoch ms).
    """
    camera = camera or default_camera(path, fmt)
    return [
        to_record(
            payload, fmt=fmt, camera=camera, fps=fps, stream_start_ms=stream_start_ms
        )
        for payload in read_payloads(path, fmt=fmt)
    ]


def to_record(
    payload: bytes,
    *,
    fmt: str,
    camera: str | None = None,
    fps: float = DEFAULT_FPS,
    stream_start_ms: int = 0,
) -> ReplayRecord:
    """Return the record of one payload; key and time ``None`` if unreadable."""
    if fmt == "mot":
        return ReplayRecord(
            _encoded(camera), _mot_time_ms(payload, fps, stream_start_ms), payload
        )
    decoded = _decode_object(payload) or {}
    if fmt == "dlstreamer":
        return ReplayRecord(
            _encoded(camera), _dlstreamer_time_ms(decoded, stream_start_ms), payload
        )

    read_camera, read_time = _JSON_READERS[fmt]
    return ReplayRecord(_encoded(read_camera(decoded)), read_time(decoded), payload)


def _encoded(camera: object) -> bytes | None:
    return camera.encode("utf-8") if isinstance(camera, str) and camera else None


def _mot_time_ms(payload: bytes, fps: float, stream_start_ms: int) -> int | None:
    try:
        frame = float(payload.split(b",", 1)[0])
    except ValueError:
        return None
    if not frame.is_integer() or frame < 1:
        return None
    return stream_start_ms + round((frame - 1) * 1000 / fps)


def _dlstreamer_time_ms(line: dict[str, Any], stream_start_ms: int) -> int | None:
    offset_ns = line.get("timestamp")
    if isinstance(offset_ns, bool) or not isinstance(offset_ns, int) or offset_ns < 0:
        return None
    return stream_start_ms + offset_ns // 1_000_000


def _epoch_ms(value: object) -> int | None:
    if value is None:
        return None
    try:
        return to_epoch_ms(value, naive="utc")
    except RejectedEvent:
        return None


def _frigate_object(message: dict[str, Any]) -> dict[str, Any]:
    after = message.get("after")
    return after if isinstance(after, dict) else message


def _frigate_time_ms(message: dict[str, Any]) -> int | None:
    tracked = _frigate_object(message)
    stamp = tracked.get("frame_time")
    return _epoch_ms(tracked.get("start_time") if stamp is None else stamp)


def _deepstream_camera(message: dict[str, Any]) -> object:
    sensor = message.get("sensor")
    return sensor.get("id") if isinstance(sensor, dict) else None


def _unified_time_ms(event: dict[str, Any]) -> int | None:
    value = event.get("event_time_ms")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


_Reader = Callable[[dict[str, Any]], Any]
_JSON_READERS: Final[dict[str, tuple[_Reader, _Reader]]] = {
    "deepstream": (_deepstream_camera, lambda m: _epoch_ms(m.get("@timestamp"))),
    "frigate": (lambda m: _frigate_object(m).get("camera"), _frigate_time_ms),
    "unified": (lambda m: m.get("camera_id"), _unified_time_ms),
}


# -- rewriting times ----------------------------------------------------------


def rebase_records(
    records: Sequence[ReplayRecord], *, fmt: str, now_ms: int
) -> list[ReplayRecord]:
    """Shift every event time so that the first record's time is ``now_ms``.

    The record timestamps move, and so do the times inside DeepStream, Frigate
    and unified payloads (MOT and DL Streamer payloads hold only stream
    offsets). A record without a time is left as it is.
    """
    first_ms = next(
        (r.timestamp_ms for r in records if r.timestamp_ms is not None), None
    )
    if first_ms is None:
        return list(records)

    shift_ms = now_ms - first_ms
    return [_shifted(record, fmt=fmt, shift_ms=shift_ms) for record in records]


def _shifted(record: ReplayRecord, *, fmt: str, shift_ms: int) -> ReplayRecord:
    if record.timestamp_ms is None:
        return record
    value = record.value
    if fmt in _PAYLOAD_SHIFTERS:
        decoded = _decode_object(value)
        if decoded is not None:
            _PAYLOAD_SHIFTERS[fmt](decoded, shift_ms)
            value = orjson.dumps(decoded)
    return ReplayRecord(record.key, record.timestamp_ms + shift_ms, value)


def _shift_deepstream(message: dict[str, Any], shift_ms: int) -> None:
    epoch_ms = _epoch_ms(message.get("@timestamp"))
    if epoch_ms is not None:
        message["@timestamp"] = _iso_ms(epoch_ms + shift_ms)


def _iso_ms(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms // 1000, tz=UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{epoch_ms % 1000:03d}Z"


def _shift_frigate(message: dict[str, Any], shift_ms: int) -> None:
    for holder in (message, message.get("before"), message.get("after")):
        if not isinstance(holder, dict):
            continue
        for field in _FRIGATE_TIME_FIELDS:
            value = holder.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                holder[field] = value + shift_ms / 1000


def _shift_unified(event: dict[str, Any], shift_ms: int) -> None:
    event["event_time_ms"] += shift_ms


_PAYLOAD_SHIFTERS: Final[dict[str, Callable[[dict[str, Any], int], None]]] = {
    "deepstream": _shift_deepstream,
    "frigate": _shift_frigate,
    "unified": _shift_unified,
}


# -- planning and sending -----------------------------------------------------


def plan_sends(
    records: Sequence[ReplayRecord],
    *,
    speed: float | None,
    duplicate_rate: float = 0.0,
    seed: int = 0,
) -> list[PlannedSend]:
    """Return every send, in file order, with its time and its duplicates.

    Pacing follows event time in file order: a record is due when the latest
    event time seen so far (itself included) has advanced, divided by
    ``speed``; a record out of order (older than one before it) is due at once
    after its predecessor, and does not rewind the clock. ``speed=None`` sends
    everything at once.

    After each record, a copy is sent with probability ``duplicate_rate``
    (drawn from ``random.Random(seed)``), at the same time, byte for byte.
    """
    rng = random.Random(seed)
    plan: list[PlannedSend] = []
    for record, at_s in zip(records, _due_times_s(records, speed), strict=True):
        plan.append(PlannedSend(record, at_s, duplicate=False))
        if rng.random() < duplicate_rate:
            plan.append(PlannedSend(record, at_s, duplicate=True))
    return plan


def _due_times_s(records: Sequence[ReplayRecord], speed: float | None) -> list[float]:
    if speed is None:
        return [0.0] * len(records)
    due_s: list[float] = []
    first_ms: int | None = None
    advanced_ms = 0
    for record in records:
        if record.timestamp_ms is not None:
            if first_ms is None:
                first_ms = record.timestamp_ms
            advanced_ms = max(advanced_ms, record.timestamp_ms - first_ms)
        due_s.append(advanced_ms / 1000 / speed)
    return due_s


async def replay(
    plan: Sequence[PlannedSend],
    *,
    bootstrap: str,
    topic: str,
    quiet: bool = False,
) -> ReplayStats:
    """Send a plan to a topic, paced, and wait until every record is acked.

    Raises:
        KafkaError: the broker refused or could not be reached.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=10,
        max_batch_size=512 * 1024,
        client_id="aggregator-replay",
    )
    await producer.start()
    try:
        return await _send_plan(producer, plan, topic=topic, quiet=quiet)
    finally:
        await producer.stop()


async def _send_plan(
    producer: AIOKafkaProducer,
    plan: Sequence[PlannedSend],
    *,
    topic: str,
    quiet: bool,
) -> ReplayStats:
    pending: list[asyncio.Future[Any]] = []
    start_s = time.monotonic()

    with tqdm(total=len(plan), unit="msg", file=sys.stderr, disable=quiet) as bar:
        for planned in plan:
            await _sleep_until(start_s + planned.at_s)
            pending.append(await _send(producer, topic, planned.record))
            bar.update()
            if len(pending) >= _MAX_PENDING_SENDS:
                await _settle(pending)
        await _settle(pending)

    duplicates = sum(1 for planned in plan if planned.duplicate)
    elapsed_s = time.monotonic() - start_s
    return ReplayStats(len(plan) - duplicates, duplicates, elapsed_s)


async def _sleep_until(due_s: float) -> None:
    delay_s = due_s - time.monotonic()
    if delay_s > 0:
        await asyncio.sleep(delay_s)


async def _send(
    producer: AIOKafkaProducer, topic: str, record: ReplayRecord
) -> asyncio.Future[Any]:
    return await producer.send(
        topic,
        value=record.value,
        key=record.key,
        timestamp_ms=record.timestamp_ms,
        headers=_HEADERS,
    )


async def _settle(pending: list[asyncio.Future[Any]]) -> None:
    await asyncio.gather(*pending)
    pending.clear()


# -- command line -------------------------------------------------------------


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    factor = float(text)
    if factor < 0:
        raise argparse.ArgumentTypeError("speed must be >= 0 or 'max'")
    return factor or None


def _rate(text: str) -> float:
    rate = float(text)
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError("rate must be within 0..1")
    return rate


def _positive_int(text: str) -> int:
    number = int(text)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregator-replay",
        description="Replay a recorded detector file into a detector topic.",
        epilog=(
            "Every record is keyed by camera id, stamped with its event time "
            f"and marked with the header {REPLAY_HEADER}: 1. Malformed messages "
            "(lines that are not JSON, rows that are not numbers, missing "
            "camera or time) are sent as they are, without the key or time "
            "that cannot be read: the service must dead-letter them. Only "
            "blank lines are skipped, with a warning."
        ),
    )
    _add_input_arguments(parser)
    _add_pacing_arguments(parser)
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the recorded file")
    parser.add_argument("--format", choices=FORMATS, help="default: guessed")
    parser.add_argument(
        "--topic", help="default: the rules-file source whose adapter is the format"
    )
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092"),
        help="default: $KAFKA_BOOTSTRAP or localhost:9092",
    )
    parser.add_argument(
        "--camera",
        help="key of mot/dlstreamer records; default: the MOT sequence folder "
        "name, or dlstreamer-<file stem>",
    )
    parser.add_argument(
        "--fps", type=float, help="MOT frame rate; default: seqinfo.ini, else 25"
    )


def _add_pacing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        metavar="FACTOR",
        help="real speed times FACTOR, from event-time gaps in file order; "
        "0 or 'max': as fast as possible (default 1)",
    )
    parser.add_argument(
        "--duplicates",
        type=_rate,
        default=0.0,
        metavar="RATE",
        help="send each message again, byte for byte, with this probability",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --duplicates")
    parser.add_argument("--limit", type=_positive_int, help="send the first N only")
    parser.add_argument(
        "--rebase-time",
        action="store_true",
        help="shift all event times so that the first message is now",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _topic_for(fmt: str) -> str:
    path = os.environ.get("AGGREGATOR_RULES") or _DEFAULT_RULES
    prefix = os.environ.get("AGGREGATOR_TOPIC_PREFIX", "")
    rules = load_rules(path).with_topic_prefix(prefix)
    for source in rules.sources:
        if source.adapter == fmt:
            return source.topic
    raise ConfigError(f"no source of adapter {fmt!r} in {path}; pass --topic")


def _records(args: argparse.Namespace) -> tuple[str, list[ReplayRecord]]:
    payloads = read_payloads(args.file, fmt=args.format or "")
    fmt = args.format or guess_format(payloads)
    now_ms = time.time_ns() // 1_000_000

    fps = args.fps or read_fps(args.file)
    camera = args.camera or default_camera(args.file, fmt)
    records = [
        to_record(payload, fmt=fmt, camera=camera, fps=fps, stream_start_ms=now_ms)
        for payload in payloads[: args.limit]
    ]

    if args.rebase_time:
        records = rebase_records(records, fmt=fmt, now_ms=now_ms)
    return fmt, records


async def _run(args: argparse.Namespace) -> ReplayStats:
    fmt, records = _records(args)
    topic = args.topic or _topic_for(fmt)
    plan = plan_sends(
        records, speed=args.speed, duplicate_rate=args.duplicates, seed=args.seed
    )
    logger.info(
        "replay: starting: file=%s format=%s topic=%s records=%d sends=%d",
        args.file,
        fmt,
        topic,
        len(records),
        len(plan),
    )
    stats = await replay(plan, bootstrap=args.bootstrap, topic=topic, quiet=args.quiet)
    _print_summary(stats, topic)
    return stats


def _print_summary(stats: ReplayStats, topic: str) -> None:
    records = stats.sent + stats.duplicates
    rate_per_s = records / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    print(
        f"replay: sent={stats.sent} duplicates={stats.duplicates} topic={topic} "
        f"elapsed_s={stats.elapsed_s:.3f} rate_per_s={rate_per_s:.1f}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_run(args))
    except (AggregatorError, OSError) as exc:
        logger.error("replay: failed: error=%s", exc)
        return 1
    except KafkaError as exc:
        logger.error("replay: kafka failed: error=%r", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
