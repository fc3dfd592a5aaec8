"""The main job: one worker, a replay of real detector data, and what came out.

``python -m aggregator_app.demo`` (run by ``scripts/main-job.sh``, which first
installs everything and starts Kafka) does, in order:

1. start ``faust -A aggregator_app worker`` with topics and a consumer group of
   its own for this run (``AGGREGATOR_TOPIC_PREFIX``, ``AGGREGATOR_APP_ID``);
2. replay the DeepStream garage recording into the detector topic as fast as
   possible, with a share of injected redeliveries;
3. wait until the worker has handled every record and closed every span;
4. print what came out: events in, rejected, duplicates removed, aggregated
   events published, rows stored, and how many of them a live-stream client
   (Server-Sent Events, subscribed before the replay) received; then stop
   the worker.

The worker's web port asks for a token (:mod:`aggregator_app.access`): the
job makes one for its run unless ``AGGREGATOR_API_TOKEN`` is set, and prints
the dashboard's address with it.

The store is the worker's: embedded ClickHouse unless ``CLICKHOUSE_URL`` names
a server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["main"]

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
_GARAGE_FILES = (
    _REPO_ROOT.parent / "shared/data/deepstream-360d-garage/demo-1.jsonl",
    _REPO_ROOT / "tests/fixtures/deepstream-360d-garage/demo-1.jsonl",
)


def main(argv: list[str] | None = None) -> int:
    """Run the demo job; return the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    run_id = f"demo-{int(time.time())}"
    data_dir = _REPO_ROOT / ".var" / "runs" / run_id
    data_dir.mkdir(parents=True, exist_ok=True)
    env = _worker_env(run_id, data_dir, args.port)

    worker = _start_worker(env, data_dir / "worker.log")
    try:
        base_url = f"http://127.0.0.1:{args.port}"
        _wait_ready(base_url, worker, timeout_s=args.timeout_s)
        _print_dashboard(base_url, env)
        stream = _StreamCounter(base_url, token=env.get("AGGREGATOR_API_TOKEN"))
        stream.start()
        sent = _replay(args, env)
        summary = _wait_done(base_url, sent=sent, timeout_s=args.timeout_s)
        summary["streamed"] = stream.wait_for(_published(summary), timeout_s=10.0)
        _print_summary(summary, run_id=run_id, log=data_dir / "worker.log")
    finally:
        _stop_worker(worker)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=_default_file())
    parser.add_argument(
        "--duplicates",
        type=float,
        default=0.05,
        help="share of records sent twice (default 0.05)",
    )
    parser.add_argument(
        "--speed", default="max", help="replay speed factor, or max (default)"
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("AGGREGATOR_WEB_PORT", "8014"))
    )
    parser.add_argument("--timeout-s", type=float, default=300.0)
    return parser.parse_args(argv)


def _default_file() -> Path:
    for path in _GARAGE_FILES:
        if path.exists():
            return path
    return _GARAGE_FILES[-1]


def _worker_env(run_id: str, data_dir: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AGGREGATOR_TOPIC_PREFIX", f"{run_id}.")
    env.setdefault("AGGREGATOR_APP_ID", run_id)
    env.setdefault("AGGREGATOR_DATA_DIR", str(data_dir))
    env["AGGREGATOR_WEB_PORT"] = str(port)
    if env.get("AGGREGATOR_AUTH", "on").lower() not in ("off", "false", "0", "no"):
        env.setdefault("AGGREGATOR_API_TOKEN", secrets.token_urlsafe(24))
    return env


def _print_dashboard(base_url: str, env: dict[str, str]) -> None:
    token = env.get("AGGREGATOR_API_TOKEN")
    query = f"?token={token}" if token else ""
    print(f"dashboard: {base_url}/aggregator/dashboard/{query}", flush=True)


class _StreamCounter(threading.Thread):
    """A live-stream client: counts the aggregated events sent to it over SSE."""

    def __init__(self, base_url: str, *, token: str | None) -> None:
        super().__init__(name="demo-stream", daemon=True)
        self._url = f"{base_url}/aggregator/stream/events/"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.events = 0

    def start(self) -> None:
        """Connect, and return once the stream has said it is ready."""
        super().start()
        if not self._ready.wait(timeout=30.0):
            logger.warning("demo: the live stream did not answer; not counted")

    def run(self) -> None:
        request = urllib.request.Request(self._url, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                self._count(response)
        except (urllib.error.URLError, OSError) as exc:
            logger.warning("demo: live stream ended: error=%r", exc)

    def _count(self, lines: Any) -> None:
        """Count the frames with data and no ``event:`` name (those are events)."""
        named = has_data = False
        for line in lines:
            if line.startswith(b"event: "):
                named = True
                self._ready.set()
            elif line.startswith(b"data: "):
                has_data = True
            elif not line.strip():
                if has_data and not named:
                    with self._lock:
                        self.events += 1
                named = has_data = False

    def wait_for(self, count: int, *, timeout_s: float) -> int:
        """Return the events received, once ``count`` or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.events < count:
            time.sleep(0.2)
        with self._lock:
            return self.events


#: Counters of everything published on the aggregated topic.
_PUBLISHED_COUNTERS = (
    "published_open",
    "published_closed",
    "correlated_open",
    "correlated_closed",
    "episodes_published",
    "actions_published",
)


def _published(summary: dict[str, Any]) -> int:
    counts = summary.get("counts", {})
    return sum(int(counts.get(name, 0)) for name in _PUBLISHED_COUNTERS)


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    faust_bin = Path(sys.executable).parent / "faust"
    command = [str(faust_bin), "-A", "aggregator_app", "worker", "-l", "info"]
    logger.info("demo: starting worker: %s (log: %s)", " ".join(command), log_path)
    log = log_path.open("wb")
    return subprocess.Popen(command, cwd=_REPO_ROOT, env=env, stdout=log, stderr=log)


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _wait_ready(
    base_url: str, worker: subprocess.Popen[bytes], *, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"demo: the worker exited with code {worker.returncode}")
        counts = _get_json(f"{base_url}/aggregator/counts/")
        if counts is not None and counts.get("assigned_partitions", 0) > 0:
            return
        time.sleep(0.5)
    raise SystemExit("demo: the worker did not become ready in time")


def _replay(args: argparse.Namespace, env: dict[str, str]) -> int:
    command = [
        sys.executable,
        "-m",
        "aggregator_app.replay",
        str(args.file),
        "--format",
        "deepstream",
        "--speed",
        str(args.speed),
        "--duplicates",
        str(args.duplicates),
        "--seed",
        "1",
    ]
    logger.info("demo: replaying %s", args.file)
    result = subprocess.run(
        command, cwd=_REPO_ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True
    )
    sys.stdout.write(result.stdout)
    fields = dict(part.split("=", 1) for part in result.stdout.split() if "=" in part)
    return int(fields["sent"]) + int(fields.get("duplicates", "0"))


def _wait_done(base_url: str, *, sent: int, timeout_s: float) -> dict[str, Any]:
    """Wait until every record is handled, every span, object and episode
    closed, every row stored."""
    deadline = time.monotonic() + timeout_s
    summary: dict[str, Any] = {}
    while time.monotonic() < deadline:
        summary = _get_json(f"{base_url}/aggregator/summary/") or {}
        counts = summary.get("counts", {})
        handled = counts.get("received", 0) >= sent
        deduplicated = counts.get("kept", 0) + counts.get("repeats", 0) + counts.get(
            "redeliveries", 0
        ) >= counts.get("accepted_events", 1)
        closed = counts.get("published_closed", -1) >= counts.get("published_open", 0)
        closed = closed and counts.get("correlated_closed", -1) >= counts.get(
            "correlated_open", 0
        )
        closed = closed and counts.get("episode_objects_open", 1) == 0
        stored = counts.get("store_backlog_rows", 1) == 0
        stored = stored and counts.get("in_flight_records", 1) == 0
        if handled and deduplicated and closed and stored:
            return summary
        time.sleep(1.0)
    logger.warning("demo: gave up waiting; the figures below are partial")
    return summary


def _print_summary(summary: dict[str, Any], *, run_id: str, log: Path) -> None:
    counts = summary.get("counts", {})
    stored = summary.get("stored", {})
    rows = [
        ("records received", counts.get("received")),
        ("accepted", counts.get("accepted_messages")),
        ("rejected (dead-lettered)", counts.get("rejected")),
        ("  by reason", counts.get("rejected_by_reason")),
        ("events kept", counts.get("kept")),
        ("repeats removed", counts.get("repeats")),
        ("redeliveries removed", counts.get("redeliveries")),
        ("late (beyond grace)", counts.get("late")),
        ("observations published (open)", counts.get("published_open")),
        ("observations published (closed)", counts.get("published_closed")),
        ("objects correlated (global ids)", counts.get("correlated_open")),
        ("  closed", counts.get("correlated_closed")),
        ("  late (to late-events)", counts.get("correlation_late")),
        ("episodes published", counts.get("episodes_published")),
        ("actions published", counts.get("actions_published")),
        ("detector events stored", stored.get("detector_events")),
        ("aggregated events stored", stored.get("aggregated_events")),
        ("aggregated events published", _published(summary)),
        ("aggregated events streamed (SSE)", summary.get("streamed")),
    ]
    print(f"\nrun {run_id} (worker log: {log})")
    for label, value in rows:
        print(f"  {label:<34} {value}")


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


if __name__ == "__main__":
    sys.exit(main())
