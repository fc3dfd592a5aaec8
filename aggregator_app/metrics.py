"""Counters of one worker, kept in memory and logged and served over the web port."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["WorkerCounters", "counters", "prometheus_text"]

logger = logging.getLogger(__name__)


@dataclass
class WorkerCounters:
    """What one worker has seen since it started.

    ``received == accepted_messages + rejected`` always holds; one accepted
    message may yield several events (``accepted_events``).
    """

    received: int = 0
    accepted_messages: int = 0
    accepted_events: int = 0
    rejected: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    repeats: int = 0
    redeliveries: int = 0
    reprocessed: int = 0
    late: int = 0
    published_open: int = 0
    published_closed: int = 0

    def reject(self, reason: str) -> None:
        """Count one rejected message."""
        self.rejected += 1
        self.rejected_by_reason[reason] += 1

    def as_dict(self) -> dict[str, object]:
        """Return the counters as a JSON-ready dict."""
        data: dict[str, object] = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name != "rejected_by_reason"
        }
        data["rejected_by_reason"] = dict(self.rejected_by_reason)
        return data

    def log(self) -> None:
        """Log the counters at INFO level."""
        logger.info(
            "counts: received=%d accepted=%d rejected=%d kept=%d repeats=%d "
            "redeliveries=%d late=%d published_open=%d published_closed=%d",
            self.received,
            self.accepted_messages,
            self.rejected,
            self.kept,
            self.repeats,
            self.redeliveries,
            self.late,
            self.published_open,
            self.published_closed,
        )


counters = WorkerCounters()

_COUNTER_HELP = {
    "received": "Records read from detector topics.",
    "accepted_messages": "Records turned into events.",
    "accepted_events": "Events accepted (a record may hold several).",
    "rejected": "Records sent to the dead-letter topic.",
    "kept": "Events kept by deduplication.",
    "repeats": "Events absorbed as repeats.",
    "redeliveries": "Events absorbed as redeliveries.",
    "reprocessed": "Kept events read again after a restart.",
    "late": "Events older than the watermark by more than the grace period.",
    "published_open": "Open observations published.",
    "published_closed": "Closed observations published.",
}


def prometheus_text(data: WorkerCounters, gauges: dict[str, float]) -> str:
    """Return the counters and ``gauges`` in Prometheus' text format.

    Counter names get the prefix ``aggregator_`` and the suffix ``_total``;
    rejects are one counter with a ``reason`` label.
    """
    lines: list[str] = []
    for name, help_text in _COUNTER_HELP.items():
        metric = f"aggregator_{name}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        lines.append(f"{metric} {getattr(data, name)}")

    metric = "aggregator_rejected_by_reason_total"
    lines += [
        f"# HELP {metric} Rejected records by reason.",
        f"# TYPE {metric} counter",
    ]
    for reason, count in sorted(data.rejected_by_reason.items()):
        lines.append(f'{metric}{{reason="{reason}"}} {count}')

    for name, value in gauges.items():
        lines += [f"# TYPE aggregator_{name} gauge", f"aggregator_{name} {value}"]
    return "\n".join(lines) + "\n"
